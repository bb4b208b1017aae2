"""Look inside real models: the capture core, the seed papers' analyses, and ``attnlab inspect``.

Importing this package registers every analysis in ``attnlab.analysis.base.ANALYSES`` (one import line per module).
"""

from .base import ANALYSES, Inputs, Result, analysis, make_inputs  # noqa: F401
from .capture import Capture, head_gates  # noqa: F401
from .text import eval_text  # noqa: F401

# analysis modules (each registers its analyses on import)
from . import metrics  # noqa: F401,E402
from . import heads  # noqa: F401,E402
from . import sinks  # noqa: F401,E402
from . import collapse  # noqa: F401,E402
from . import attribution  # noqa: F401  (rollout, flow, relevance, saliency-share)
from . import retrieval  # noqa: F401,E402  retrieval-heads, attention-influence
