"""A fused CPU kernel for softmax attention over many small tiles (``tile_attention.cpp``), built on first use.

Window, block, halo and neighbourhood attention run thousands of independent problems of 16..256 queries and keys.
PyTorch's SDPA reaches about a third of its dense rate on such tiles (its blocked kernel and BLAS calls do not
amortise on 64 x 64 matrices); this kernel keeps each tile in a per-thread workspace and runs its two products with
register-blocked vector code, forward and backward (the backward recomputes the probabilities from the saved
log-sum-exp).

The C++ source has no PyTorch headers: it is compiled once per machine with ``g++ -O3 -march=native`` into
``$ATTNLAB_CACHE/kernels`` (a second or two) and called through :mod:`ctypes` on the tensors' memory. When no
compiler is available, the build fails, or ``ATTNLAB_NATIVE=0`` is set, :func:`available` is False and callers keep
their SDPA path; :func:`status` says why.

Only float32 CPU tensors whose last dimension is contiguous are taken (:func:`supports`); everything else (float64
for gradcheck, bf16, other devices) goes to SDPA, so the conformance suite's float64 checks test that path and the
tests of this module compare this one with the reference on outputs and gradients.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ...files import cache_dir

__all__ = ["available", "status", "supports", "tile_attention", "disabled", "MAX_TILE"]

_SOURCE = Path(__file__).with_name("tile_attention.cpp")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-pthread"]
MAX_TILE = 512  # queries or keys per tile above which SDPA's blocked kernel is as fast (and its memory smaller)

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_STATUS: str | None = None


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, platform.machine(), _cpu_id()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"tile_attention-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tile_attention-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # readers see no library or the whole one
        finally:
            Path(tmp).unlink(missing_ok=True)
    lib = ctypes.CDLL(str(target))
    p, f, i = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.attnlab_tile_forward.argtypes = [p, p, f, p, p, p, p, p, p, i]
    lib.attnlab_tile_backward.argtypes = [p, p, f, p, p, p, p, p, p, p, p, p, p, p, p, i]
    lib.attnlab_tile_forward.restype = lib.attnlab_tile_backward.restype = i
    return lib


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cached library built on another CPU could use
    instructions this one lacks)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _lib() -> ctypes.CDLL | None:
    global _LIB, _STATUS
    if _STATUS is None:
        with _LOCK:
            if _STATUS is None:
                if os.environ.get("ATTNLAB_NATIVE", "1") == "0":
                    _STATUS = "disabled by ATTNLAB_NATIVE=0"
                else:
                    try:
                        _LIB = _build()
                        _STATUS = "ok"
                    except Exception as e:  # noqa: BLE001 - any build failure means: use the SDPA path
                        _STATUS = f"unavailable: {type(e).__name__}: {e}"
    return _LIB


def available() -> bool:
    """Whether the fused kernel is built and enabled on this machine (builds it on the first call)."""
    return _lib() is not None


def status() -> str:
    """``"ok"``, or why the fused kernel is not used."""
    _lib()
    return _STATUS or "unknown"


_OFF = threading.local()


@contextmanager
def disabled():
    """Within this block (in this thread) :func:`supports` is False: callers take their SDPA path. For comparisons
    (``attnlab bench`` times both) and for tests."""
    before = getattr(_OFF, "on", False)
    _OFF.on = True
    try:
        yield
    finally:
        _OFF.on = before


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`tile_attention` takes these tiles: float32 on the CPU, last dimensions contiguous, tiles of at
    most ``MAX_TILE`` queries and keys, a 4-D additive float32 or boolean (True = keep) mask or none, and the kernel
    available."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 for t in (q, k, v)):
        return False
    if mask is not None and (mask.device.type != "cpu" or mask.dtype not in (torch.float32, torch.bool)
                             or mask.dim() != 4):
        return False
    if max(q.shape[2], k.shape[2]) > MAX_TILE or q.shape[2] == 0 or k.shape[2] == 0 or getattr(_OFF, "on", False):
        return False
    return available()


def _strides(t: Tensor) -> list[int]:
    """(tile, head, row) strides in elements; 0 along broadcast dimensions."""
    return [s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3])]


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class _TileAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        T, Hq, tq, D = q.shape
        Hkv, tk, Dv = k.shape[1], k.shape[2], v.shape[3]
        q, k, v = (_unit_last(t) for t in (q, k, v))
        m = None if mask is None else _unit_last(mask.expand(T, Hq, tq, tk))
        # token-major output, as SDPA returns it: (T, tq, Hq, Dv) viewed as (T, Hq, tq, Dv)
        o = torch.empty(T, tq, Hq, Dv, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(T, Hq, tq, dtype=q.dtype)
        sizes = torch.tensor([T, Hq, Hkv, tq, tk, D, Dv], dtype=torch.int64)
        strides = torch.tensor(_strides(q) + _strides(k) + _strides(v) + (_strides(m) if m is not None else [0] * 3)
                               + _strides(o), dtype=torch.int64)
        _LIB.attnlab_tile_forward(_ptr(sizes), _ptr(strides), scale, _ptr(q), _ptr(k), _ptr(v), _ptr(m), _ptr(o),
                                  _ptr(lse), torch.get_num_threads())
        ctx.save_for_backward(q, k, v, m, o, lse)
        ctx.scale, ctx.mask_shape = scale, None if mask is None else mask.shape
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, m, o, lse = ctx.saved_tensors
        T, Hq, tq, D = q.shape
        Hkv, tk, Dv = k.shape[1], k.shape[2], v.shape[3]
        do = _unit_last(do)
        dlse = None if dlse is None or not bool(dlse.any()) else dlse.contiguous()
        dq = torch.empty(T, tq, Hq, D, dtype=q.dtype).transpose(1, 2)
        dk = torch.empty(T, tk, Hkv, D, dtype=q.dtype).transpose(1, 2)
        dv = torch.empty(T, tk, Hkv, Dv, dtype=q.dtype).transpose(1, 2)
        want_mask = m is not None and ctx.needs_input_grad[3]
        dm = torch.empty(T, Hq, tq, tk, dtype=q.dtype) if want_mask else None
        sizes = torch.tensor([T, Hq, Hkv, tq, tk, D, Dv], dtype=torch.int64)
        strides = torch.tensor(_strides(q) + _strides(k) + _strides(v) + (_strides(m) if m is not None else [0] * 3)
                               + _strides(o) + _strides(do) + _strides(dq) + _strides(dk) + _strides(dv),
                               dtype=torch.int64)
        _LIB.attnlab_tile_backward(_ptr(sizes), _ptr(strides), ctx.scale, _ptr(q), _ptr(k), _ptr(v), _ptr(m), _ptr(o),
                                   _ptr(lse), _ptr(do), _ptr(dlse), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dm),
                                   torch.get_num_threads())
        dmask = dm.sum_to_size(ctx.mask_shape) if want_mask else None
        return dq, dk, dv, dmask, None


def tile_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
                   return_lse: bool = False):
    """Softmax attention within each tile: ``q (T, Hq, tq, D)``, ``k, v (T, Hkv, tk, D[v])``, ``mask`` additive
    logits broadcastable to ``(T, Hq, tq, tk)`` (``-inf`` = hidden; gets a gradient when it requires one) or a
    boolean mask of that shape (True = keep).

    Same semantics as :func:`attnlab.ops.attention` with ``attn_mask``: a query that sees no key returns 0 (and
    lse ``-inf``). Returns ``(T, Hq, tq, Dv)`` (a transposed view of token-major memory), and the log-sum-exp
    ``(T, Hq, tq)`` with ``return_lse``. Call only when :func:`supports` is True.
    """
    if _lib() is None:
        raise RuntimeError(f"the fused tile kernel is {status()}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"tile_attention: expected query heads to be a multiple of key heads, got {q.shape[1]} "
                         f"and {k.shape[1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    o, lse = _TileAttention.apply(q, k, v, mask, scale)
    return (o, lse) if return_lse else o
