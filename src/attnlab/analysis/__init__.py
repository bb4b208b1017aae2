"""Look inside real models: the capture core, the seed papers' analyses, and ``attnlab inspect``.

Importing this package registers every analysis in ``attnlab.analysis.base.ANALYSES`` (one import line per module).
"""

from .base import ANALYSES, Inputs, Result, analysis, make_inputs  # noqa: F401
from .capture import Capture, head_gates  # noqa: F401
from .text import eval_text  # noqa: F401

# analysis modules (each registers its analyses on import)
from . import retrieval  # noqa: F401,E402  retrieval-heads, attention-influence
