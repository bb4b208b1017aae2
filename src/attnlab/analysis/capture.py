"""One attention-capture core for Hugging Face models: probabilities, logits, q/k/v and head outputs, per layer and
head, without switching the model to eager attention.

How it works. ``transformers`` models call their attention through a registry of attention functions
(``AttentionInterface``). attnlab registers one more, ``"attnlab"``. Inside a :class:`Capture` context the model
runs that function; it receives the model's own ``query`` (after RoPE), ``key`` and ``value`` (before the KV heads
are repeated for grouped-query attention), the mask and the scaling, and:

- for layers nobody asked about, calls the stock SDPA function unchanged (same kernel, same numbers);
- for captured layers, recomputes ``softmax(q k^T * scale + mask)`` for the heads and query rows asked for only
  (GQA-aware: query head ``h`` reads KV head ``h // (H / H_kv)``), and stores or streams the requested tensors;
- multiplies each head's output by a gate when gates are given (ablation with 0, importance by the gradient of
  the loss with respect to a gate of 1; transformers v5 removed ``head_mask``);
- with ``explicit=True``, computes the captured layers' outputs from the materialised probabilities, so that
  gradients with respect to the probabilities exist (relevance methods need them). Without it the output comes
  from SDPA and the captured probabilities are a side computation;
- intervenes when asked: ``logit_scale`` multiplies every layer's attention logits (a softmax temperature
  ``1 / tau``; SDPA is kept, only its scaling changes), and ``edit_probs(layer, probs) -> probs`` rewrites every
  layer's probabilities before they multiply the values (that layer then runs the explicit path).

Memory stays bounded: only the asked-for (layer, head, row) slices are kept, and with ``on_layer`` each layer's
record is handed to a callback and dropped (``keep=False``), so L x H x N x N is never held unless asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["CAPTURABLE", "Capture", "LayerRecord", "attention_modules", "head_gates", "register_attention_function"]

CAPTURABLE = ("probs", "logits", "q", "k", "v", "out")
_NAME = "attnlab"
_ACTIVE: list["Capture"] = []
_REGISTERED = False


@dataclass
class LayerRecord:
    """What one captured layer produced. Shapes: ``probs``/``logits`` ``(B, h, r, Nk)``; ``q`` ``(B, h, r, D)``;
    ``k``/``v`` ``(B, h, Nk, D)`` (KV heads repeated to the selected query heads); ``out`` ``(B, r, h, D)`` -- each
    head's attention output before the output projection (after its gate). ``h`` = selected heads, ``r`` =
    selected query rows."""

    layer: int
    heads: list[int]
    rows: list[int] | None  # None = all query rows
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise KeyError(f"layer {self.layer}: {key!r} was not captured (captured: {sorted(self.tensors)}); "
                           f"ask for it with Capture(..., what=(..., {key!r}))")
        return self.tensors[key]


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of a transformers model that go through the attention-function registry,
    by layer index (modules with a ``layer_idx`` and a ``config``; cross-attention modules are skipped)."""
    found: dict[int, torch.nn.Module] = {}
    for name, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if idx is None or not hasattr(m, "config") or "cross" in name.lower() or isinstance(m, torch.nn.ModuleList):
            continue
        if not any(hasattr(m, a) for a in ("q_proj", "query", "qkv_proj", "c_attn", "Wqkv")):
            continue
        found.setdefault(int(idx), m)
    if not found:
        raise ValueError(f"model: expected a transformers model whose attention modules have a layer_idx and call "
                         f"the attention-function registry, received {type(model).__name__} with none")
    return dict(sorted(found.items()))


def head_gates(num_layers: int, num_heads: int, *, off: Iterable[tuple[int, int]] = (), requires_grad: bool = False,
               dtype=torch.float32) -> Tensor:
    """A ``(layers, heads)`` tensor of ones, with the ``(layer, head)`` pairs in ``off`` set to 0 (ablated): pass it
    as ``Capture(gates=...)``, or take ``d loss / d gates`` for gate-gradient head importance (Michel et al., 2019)."""
    g = torch.ones(num_layers, num_heads, dtype=dtype)
    for layer, head in off:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"off: expected (layer, head) within ({num_layers}, {num_heads}), received "
                             f"{(layer, head)}")
        g[layer, head] = 0
    return g.requires_grad_(requires_grad)


def _to_index(sel, n: int, what: str) -> list[int] | None:
    if sel is None:
        return None
    if isinstance(sel, slice):
        return list(range(n))[sel]
    idx = [int(i) for i in sel]
    bad = [i for i in idx if not -n <= i < n]
    if bad:
        raise ValueError(f"{what}: expected indices in [-{n}, {n}), received {bad}")
    return [i % n for i in idx]


def _full_mask(attention_mask: Tensor | None, causal: bool, nq: int, nk: int, device) -> Tensor | None:
    """The additive float mask ``(B|1, 1|H, Nq, Nk)`` equivalent to what SDPA was given (None = no mask)."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return torch.where(attention_mask, 0.0, float("-inf")).to(device)
        return attention_mask.float()
    if causal and nq > 1:
        # SDPA's is_causal is top-left; transformers only passes is_causal without a mask when Nq == Nk
        i = torch.arange(nq, device=device)[:, None] + (nk - nq)
        j = torch.arange(nk, device=device)[None, :]
        return torch.where(j <= i, 0.0, float("-inf"))[None, None]
    return None


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The registered attention function: stock SDPA unless a :class:`Capture` asks about this module's layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap = _ACTIVE[-1] if _ACTIVE else None
    layer = cap._layer_of(module) if cap is not None else None
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return cap._run(layer, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def register_attention_function() -> str:
    """Register attnlab's attention function (and SDPA's mask format for it) with transformers; returns its name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_NAME, _attention)
        AttentionMaskInterface.register(_NAME, sdpa_mask)
        _REGISTERED = True
    return _NAME


class Capture:
    """Run a transformers model under attnlab's attention function and capture attention per layer and head.

    Args:
        model: a transformers model whose attention uses the attention-function registry (Llama, BERT, ...).
        layers: layer indices to capture (None = all). Layers not listed run stock SDPA.
        heads: query-head indices to keep (None = all).
        rows: query positions to keep (None = all; e.g. ``[-1]`` for the last token only).
        what: which tensors to keep, from ``CAPTURABLE`` ("probs", "logits", "q", "k", "v", "out").
        gates: optional ``(layers, heads)`` tensor multiplying each head's output (see :func:`head_gates`).
        explicit: compute captured layers' outputs from the materialised probabilities, so gradients reach
            ``probs`` (which then ``retain_grad``); needed by gradient-weighted relevance.
        on_layer: optional callback ``f(record: LayerRecord)`` called as each layer finishes (streaming).
        keep: keep records in ``self.records`` (set False with ``on_layer`` to bound memory to one layer).
        detach: store detached tensors (default unless ``explicit``).
        logit_scale: optional factor on the attention logits of every layer (``1 / tau`` for a softmax temperature
            ``tau``), captured or not; captured probabilities are those of the scaled logits.
        edit_probs: optional ``f(layer, probs (B, H, Nq, Nk)) -> probs`` applied in every layer to the
            probabilities (after softmax and after ``logit_scale``) before they weigh the values; those layers run
            the explicit path. Captured probabilities are the edited ones.

    Usage::

        with Capture(lm.model, layers=[0, 5], what=("probs",)) as cap:
            lm.model(**inputs)
        cap.records[5]["probs"]  # (B, H, N, N)
    """

    def __init__(self, model: torch.nn.Module, *, layers: Iterable[int] | None = None,
                 heads: Sequence[int] | slice | None = None, rows: Sequence[int] | slice | None = None,
                 what: Sequence[str] = ("probs",), gates: Tensor | None = None, explicit: bool = False,
                 on_layer: Callable[[LayerRecord], Any] | None = None, keep: bool = True,
                 detach: bool | None = None, logit_scale: float | None = None,
                 edit_probs: Callable[[int, Tensor], Tensor] | None = None) -> None:
        self.model = model
        self.modules = attention_modules(model)
        self._by_id = {id(m): i for i, m in self.modules.items()}
        n_layers = len(self.modules)
        any_mod = next(iter(self.modules.values()))
        cfg = any_mod.config
        self.num_heads = int(cfg.num_attention_heads)
        bad = [w for w in what if w not in CAPTURABLE]
        if bad:
            raise ValueError(f"what: expected names from {CAPTURABLE}, received {bad}")
        self.what = tuple(what)
        self.layers = set(range(n_layers)) if layers is None else set(_to_index(list(layers), n_layers, "layers"))
        self.heads = _to_index(heads, self.num_heads, "heads")
        self.rows = rows
        if gates is not None and tuple(gates.shape) != (n_layers, self.num_heads):
            raise ValueError(f"gates: expected shape ({n_layers}, {self.num_heads}) = (layers, heads), "
                             f"received {tuple(gates.shape)}")
        self.gates = gates
        self.explicit = explicit
        self.on_layer = on_layer
        self.keep = keep
        self.detach = (not explicit) if detach is None else detach
        if logit_scale is not None and not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
                                            and logit_scale > 0):
            raise ValueError(f"logit_scale: expected a positive finite number, received {logit_scale!r}")
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        if edit_probs is not None and not callable(edit_probs):
            raise ValueError(f"edit_probs: expected a callable f(layer, probs) -> probs, received {edit_probs!r}")
        self.edit_probs = edit_probs
        self.records: dict[int, LayerRecord] = {}
        self._saved_impl: str | None = None

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        name = register_attention_function()
        self._saved_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(name)
        if self.model.config._attn_implementation != name:
            raise ValueError(f"model: {type(self.model).__name__} does not accept a registered attention function "
                             f"(its attention implementation stayed {self.model.config._attn_implementation!r})")
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self.model.set_attn_implementation(self._saved_impl)

    def __getitem__(self, layer: int) -> LayerRecord:
        if layer not in self.records:
            raise KeyError(f"layer {layer} was not captured (captured: {sorted(self.records)})")
        return self.records[layer]

    # -- the work --------------------------------------------------------------------------------------------
    def _layer_of(self, module) -> int | None:
        layer = self._by_id.get(id(module))
        if layer is None:
            return None
        if (layer in self.layers or self.gates is not None or self.logit_scale is not None
                or self.edit_probs is not None):
            return layer
        return None

    def _run(self, layer, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
            raise NotImplementedError("Capture: attention with position_bias or softcap is not supported")
        B, H, Nq, D = query.shape
        Hkv, Nk = key.shape[1], key.shape[2]
        group = H // Hkv
        captured = layer in self.layers
        if self.logit_scale is not None:
            scaling = (scaling if scaling is not None else 1.0 / math.sqrt(D)) * self.logit_scale
        if (captured and self.explicit) or self.edit_probs is not None:
            out, probs_all, logits_all = self._explicit(module, query, key, value, attention_mask, scaling, is_causal,
                                                        layer)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, is_causal=is_causal, **kwargs)
            probs_all = logits_all = None
        if self.gates is not None:
            g = self.gates[layer].to(out.dtype)
            out = out * g[None, None, :, None]
        if captured:
            self._record(layer, module, query, key, value, attention_mask, scaling, is_causal, out,
                         probs_all, logits_all, group, Nq, Nk)
        return out, None

    def _scores(self, module, q: Tensor, k: Tensor, attention_mask, scaling, is_causal, nq: int, nk: int,
                rows: list[int] | None) -> Tensor:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
        mask = _full_mask(attention_mask, causal, nq, nk, q.device)
        if mask is not None:
            if rows is not None:
                mask = mask[:, :, rows] if mask.shape[2] > 1 else mask
            logits = logits + mask
        return logits

    def _explicit(self, module, query, key, value, attention_mask, scaling, is_causal, layer):
        H, Hkv = query.shape[1], key.shape[1]
        k = key.repeat_interleave(H // Hkv, dim=1)
        v = value.repeat_interleave(H // Hkv, dim=1)
        logits = self._scores(module, query, k, attention_mask, scaling, is_causal, query.shape[2], k.shape[2], None)
        probs = _safe_softmax(logits)
        if self.edit_probs is not None:
            edited = self.edit_probs(layer, probs)
            if not isinstance(edited, Tensor) or edited.shape != probs.shape:
                raise ValueError(f"edit_probs: expected a tensor of shape {tuple(probs.shape)} for layer {layer}, "
                                 f"received {getattr(edited, 'shape', type(edited).__name__)}")
            probs = edited
        if probs.requires_grad:
            probs.retain_grad()
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2)  # (B, Nq, H, D)
        return out, probs, logits

    def _record(self, layer, module, query, key, value, attention_mask, scaling, is_causal, out,
                probs_all, logits_all, group, nq, nk) -> None:
        H = query.shape[1]
        heads = self.heads if self.heads is not None else list(range(H))
        rows = _to_index(self.rows, nq, "rows")
        hidx = torch.tensor(heads, device=query.device)
        kvidx = hidx // group
        rec = LayerRecord(layer=layer, heads=heads, rows=rows)
        want = set(self.what)

        def keep(name: str, t: Tensor) -> None:
            rec.tensors[name] = t.detach() if self.detach else t

        if want & {"probs", "logits"}:
            if probs_all is not None:
                # all heads: keep the very tensors the output was computed from, so their .grad (explicit mode)
                # is populated by backward and torch.autograd.grad can take them as inputs; a head subset is a copy
                every = heads == list(range(H))
                logits = logits_all if every else logits_all[:, hidx]
                probs = probs_all if every else probs_all[:, hidx]
                if rows is not None:
                    logits, probs = logits[:, :, rows], probs[:, :, rows]
            else:
                q = query[:, hidx] if rows is None else query[:, hidx][:, :, rows]
                logits = self._scores(module, q, key[:, kvidx], attention_mask, scaling, is_causal, nq, nk, rows)
                probs = _safe_softmax(logits)
            if "logits" in want:
                keep("logits", logits)
            if "probs" in want:
                keep("probs", probs)
        if "q" in want:
            keep("q", query[:, hidx] if rows is None else query[:, hidx][:, :, rows])
        if "k" in want:
            keep("k", key[:, kvidx])
        if "v" in want:
            keep("v", value[:, kvidx])
        if "out" in want:
            o = out[:, :, hidx]
            keep("out", o if rows is None else o[:, rows])
        if self.on_layer is not None:
            self.on_layer(rec)
        if self.keep:
            self.records[layer] = rec


def _safe_softmax(logits: Tensor) -> Tensor:
    """Softmax over keys in float32; a fully masked row gives zeros, never NaN."""
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))
