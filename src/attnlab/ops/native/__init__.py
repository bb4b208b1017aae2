"""A fused CPU kernel for softmax attention over many small tiles (``tile_attention.cpp``), built on first use.

Window, block, halo and neighbourhood attention run thousands of independent problems of 16..256 queries and keys.
PyTorch's SDPA reaches about a third of its dense rate on such tiles (its blocked kernel and BLAS calls do not
amortise on 64 x 64 matrices); this kernel keeps each tile in a per-thread workspace and runs its two products with
register-blocked vector code, forward and backward (the backward recomputes the probabilities from the saved
log-sum-exp).

The C++ source has no PyTorch headers: it is compiled once per machine with ``g++ -O3 -march=native`` into
``$ATTNLAB_CACHE/kernels`` (10-30 seconds) and called through :mod:`ctypes` on the tensors' memory. Vectors are one
machine register wide (16 floats with AVX-512, 8 with AVX2, 4 otherwise); ``ATTNLAB_NATIVE_MARCH`` (default
``native``) builds for another ``-march`` target this CPU can run, e.g. ``x86-64`` to test the 4-float build. When no
compiler is available, the build fails, or ``ATTNLAB_NATIVE=0`` is set, :func:`available` is False and callers keep
their SDPA path; :func:`status` says why.

Only float32 CPU tensors are taken (:func:`supports`; a last dimension that is not contiguous is copied first);
everything else (float64 for gradcheck, bf16, other devices) goes to SDPA, so the conformance suite's float64
checks test that path and the tests of this module compare this one with the reference on outputs and gradients.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...files import cache_dir

__all__ = ["available", "status", "supports", "tile_attention", "indexed_attention", "key_ranges", "disabled",
           "release_workspace", "MAX_TILE", "neighborhood_supports", "neighborhood_attention", "matmul_supports",
           "matmul", "channel_attention"]

_HERE = Path(__file__).parent
# compiled together into one library; the header is hashed with them
_SOURCES = (_HERE / "tile_attention.cpp", _HERE / "neighborhood.cpp")
_HEADERS = (_HERE / "vec.h",)
_FLAGS = ["-O3", f"-march={os.environ.get('ATTNLAB_NATIVE_MARCH', 'native')}", "-fno-math-errno", "-std=c++17",
          "-shared", "-fPIC", "-pthread", "-Wno-psabi"]
# The kernels' threads: OpenMP's, i.e. PyTorch's own pool (see vec.h, parallel); std::threads if the compiler has no
# OpenMP.
_OPENMP = "-fopenmp"
# Tile sizes above which SDPA's blocked kernel is as fast (and its memory smaller): queries, keys. A tile's logits
# (MAX_TILE[0] x MAX_TILE[1] floats at most, 4 MB) live in a per-thread workspace.
MAX_TILE = (512, 2048)

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_STATUS: str | None = None


def _compile(compiler: str, flags: list[str]) -> Path:
    """The library built from the sources with ``flags``: cached under a hash of the sources, the flags, the
    compiler and the CPU; written to a temporary name and renamed into place, so readers see all of it or nothing."""
    source = b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(), _cpu_id()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"tile_attention-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tile_attention-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # readers see no library or the whole one
        finally:
            Path(tmp).unlink(missing_ok=True)
    return target


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (g++ or $CXX)")
    try:
        target = _compile(compiler, [*_FLAGS, _OPENMP])
    except RuntimeError:
        target = _compile(compiler, _FLAGS)  # a compiler without OpenMP; a real compile error fails again
    lib = ctypes.CDLL(str(target))
    p, f, i = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    for fn in (lib.attnlab_tile_forward, lib.attnlab_tile_backward):
        fn.argtypes = [p, p, p, f, p, p, p, p, p, p, i]
    lib.attnlab_tile_forward.restype = lib.attnlab_tile_backward.restype = i
    for fn in (lib.attnlab_na_forward, lib.attnlab_na_backward):
        fn.argtypes = [p, p, p, f, p, p, i]
        fn.restype = i
    lib.attnlab_na_supported.argtypes = [p, p]
    lib.attnlab_na_supported.restype = i
    lib.attnlab_gemm.argtypes = [p, p, p, i, i]
    lib.attnlab_gemm.restype = i
    lib.attnlab_vector_width.restype = i
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


def vector_width() -> int:
    """Floats per vector of the built kernels (16 with AVX-512, 8 with AVX2, 4 otherwise; 0 when not built): the
    neighborhood kernel takes maps of at least this many columns, and border windows within two vectors."""
    lib = _lib()
    return lib.attnlab_vector_width() if lib is not None else 0


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


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, tiles: tuple[int, int] | None = None) -> bool:
    """Whether :func:`tile_attention` takes these tiles: float32 on the CPU, tiles of at most ``MAX_TILE`` queries
    and keys, a 4-D additive float32 or boolean (True = keep) mask or none, and the kernel
    available. ``tiles``: the (tq, tk) of :func:`indexed_attention` (default: the operands' own rows)."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 4 for t in (q, k, v)):
        return False
    if mask is not None and (mask.device.type != "cpu" or mask.dtype not in (torch.float32, torch.bool)
                             or mask.dim() != 4):
        return False
    tq, tk = tiles or (q.shape[2], k.shape[2])
    if tq > MAX_TILE[0] or tk > MAX_TILE[1] or tq == 0 or tk == 0 or getattr(_OFF, "on", False):
        return False
    return available()


class _Pool:
    """float32 result buffers that stay mapped between calls.

    A kernel call on a 128 x 128 map takes 20-40 ms; a fresh 32 MB output is new pages the OS must fault in and
    zero on first write, about 9 ms of that on this machine (two threads faulting at once serialise in the kernel).
    Results are handed out as tensors over pooled numpy buffers (``torch.from_numpy``, no copy); when a tensor and
    its views are gone, a ``weakref.finalize`` on the numpy view returns the buffer, already faulted in, for the
    next call of the same size. Only sizes of at least ``MIN_BYTES`` are pooled, and at most ``LIMIT_BYTES`` are
    kept idle (:func:`release_workspace` empties the pool).
    """

    MIN_BYTES = 1 << 20
    LIMIT_BYTES = 1 << 30

    def __init__(self) -> None:
        self.idle: dict[int, list[np.ndarray]] = {}
        self.idle_bytes = 0
        self.lock = threading.Lock()

    def empty(self, *shape: int) -> Tensor:
        n = math.prod(shape)
        if n * 4 < self.MIN_BYTES:
            return torch.empty(*shape, dtype=torch.float32)
        with self.lock:
            free = self.idle.get(n)
            base = free.pop() if free else None
            if base is not None:
                self.idle_bytes -= base.nbytes
        if base is None:
            base = np.empty(n + 15, dtype=np.float32)
        first = (-base.ctypes.data % 64) // 4  # rows start on cache lines (the kernels stream whole lines out)
        view = base[first:first + n]
        weakref.finalize(view, self._give_back, base, n)
        return torch.from_numpy(view).view(*shape)

    def zeros(self, *shape: int) -> Tensor:
        return self.empty(*shape).zero_()

    def _give_back(self, base: np.ndarray, n: int) -> None:
        with self.lock:
            if self.idle_bytes + base.nbytes <= self.LIMIT_BYTES:
                self.idle.setdefault(n, []).append(base)
                self.idle_bytes += base.nbytes

    def clear(self) -> None:
        with self.lock:
            self.idle.clear()
            self.idle_bytes = 0


_POOL = _Pool()


def release_workspace() -> None:
    """Free the idle result buffers the kernels keep between calls (see ``_Pool``)."""
    _POOL.clear()


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _op(t: Tensor | None) -> list[int]:
    """(batch, tile, head, row) element strides of a ``(B, H, rows, D)`` operand (rows addressed by index or by
    position within a tile); 0 along broadcast dimensions."""
    if t is None:
        return [0, 0, 0, 0]
    b, h, r = (s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))
    return [b, 0, h, r]


def _mask_op(m: Tensor | None) -> list[int]:
    """Strides of an additive mask ``(B, T, H, tq, tk)`` (broadcast dimensions 0)."""
    if m is None:
        return [0, 0, 0, 0]
    return [s if n > 1 else 0 for s, n in zip(m.stride()[:4], m.shape[:4])]


def _shared_strides(q, k, v, mask, o, lse) -> list[int]:
    """The strides of the operands both kernel directions take first: q, k, v, mask, o, lse (a 1-column operand)."""
    return _op(q) + _op(k) + _op(v) + _mask_op(mask) + _op(o) + _op(lse[..., None])


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Geometry:
    """Where each tile's rows are: ``B`` batch elements of ``T`` tiles; ``q_index (T, tq)`` / ``k_index (T, tk)``
    token positions (None: the operands are already tiles, ``B`` counting them), ``q_valid (T, tq)`` uint8,
    ``kpm (B, Nk)`` uint8 (1 = key kept), ``k_range (T, tq, 2)`` int32: the key slots ``[first, last)`` each query
    may see (the rest hidden; forward and backward skip the columns no query of a block sees), ``mask_sel (B * T)``
    int32: which of the mask's slots (its first dimension) each tile takes, -1 for none."""

    def __init__(self, B, T, tq, tk, q_index=None, k_index=None, q_valid=None, kpm=None, k_range=None,
                 mask_sel=None):
        self.B, self.T, self.tq, self.tk = B, T, tq, tk
        self.q_index, self.k_index, self.q_valid, self.kpm = q_index, k_index, q_valid, kpm
        self.k_range, self.mask_sel = k_range, mask_sel

    def call(self, fn, ops: list[Tensor | None], strides: list[int], D: int, Dv: int, Hq: int, Hkv: int,
             scale: float) -> None:
        sizes = torch.tensor([self.B, self.T, Hq, Hkv, self.tq, self.tk, D, Dv,
                              0 if self.kpm is None else self.kpm.stride(0)], dtype=torch.int64)
        st = torch.tensor(strides, dtype=torch.int64)
        ptrs = (ctypes.c_void_p * len(ops))(*[_ptr(t) for t in ops])
        fn(sizes.data_ptr(), st.data_ptr(), ptrs, scale, _ptr(self.q_index), _ptr(self.k_index),
           _ptr(self.q_valid), _ptr(self.kpm), _ptr(self.k_range), _ptr(self.mask_sel), torch.get_num_threads())


class _Fused(torch.autograd.Function):
    """``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk, D[v])``, ``mask (B, T, Hq, tq, tk)`` additive (broadcastable; with
    ``geo.mask_sel``, ``(slots, 1, Hq, tq, tk)``), laid out in tiles by ``geo``. Returns ``o (B, Hq, Nq, Dv)``
    (token-major memory) and ``lse (B, Hq, Nq)``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, geo, rows):
        B, Hq, _, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        o = _POOL.empty(B, rows, Hq, Dv).transpose(1, 2)
        lse = torch.empty(B, Hq, rows, dtype=q.dtype)
        geo.call(_LIB.attnlab_tile_forward, [q, k, v, mask, o, lse], _shared_strides(q, k, v, mask, o, lse),
                 D, Dv, Hq, Hkv, scale)
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.scale, ctx.geo = scale, geo
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, m, o, lse = ctx.saved_tensors
        geo = ctx.geo
        B, Hq, _, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        do = _unit_last(do)
        dlse = None if dlse is None or not bool(dlse.any()) else dlse.contiguous()
        # dq rows are written once each (every query is in exactly one valid slot); dk, dv rows are added into
        # (keys shared by tiles), so they start at zero
        dq = _POOL.empty(B, q.shape[2], Hq, D).transpose(1, 2)
        dk = _POOL.zeros(B, k.shape[2], Hkv, D).transpose(1, 2)
        dv = _POOL.zeros(B, k.shape[2], Hkv, Dv).transpose(1, 2)
        want_mask = m is not None and ctx.needs_input_grad[3]
        dm = torch.empty(geo.B, geo.T, Hq, geo.tq, geo.tk, dtype=q.dtype) if want_mask else None
        geo.call(_LIB.attnlab_tile_backward, [q, k, v, m, o, lse, do, dlse, dq, dk, dv, dm],
                 _shared_strides(q, k, v, m, o, lse) + _op(do) + _op(None if dlse is None else dlse[..., None])
                 + _op(dq) + _op(dk) + _op(dv) + [0] * 4,
                 D, Dv, Hq, Hkv, ctx.scale)
        if want_mask and geo.mask_sel is not None:  # each slot's gradient: the sum over the tiles that take it
            sel, dm = geo.mask_sel.long(), dm.view(-1, *dm.shape[2:])
            if not bool((sel >= 0).all()):
                dm, sel = dm[sel >= 0], sel[sel >= 0]
            dm = torch.zeros(m.shape[0], *dm.shape[1:], dtype=dm.dtype).index_add_(0, sel, dm).unsqueeze(1)
        dmask = dm.sum_to_size(m.shape) if want_mask else None
        return dq, dk, dv, dmask, None, None, None


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def _check(q: Tensor, k: Tensor) -> None:
    if _lib() is None:
        raise RuntimeError(f"the fused tile kernel is {status()}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"expected query heads to be a multiple of key heads, got {q.shape[1]} and {k.shape[1]}")


def tile_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
                   return_lse: bool = False):
    """Softmax attention within each tile: ``q (T, Hq, tq, D)``, ``k, v (T, Hkv, tk, D[v])``, ``mask`` additive
    logits broadcastable to ``(T, Hq, tq, tk)`` (``-inf`` = hidden; gets a gradient when it requires one) or a
    boolean mask of that shape (True = keep).

    Same semantics as :func:`attnlab.ops.attention` with ``attn_mask``: a query that sees no key returns 0 (and
    lse ``-inf``). Returns ``(T, Hq, tq, Dv)`` (a transposed view of token-major memory), and the log-sum-exp
    ``(T, Hq, tq)`` with ``return_lse``. Call only when :func:`supports` is True.
    """
    _check(q, k)
    T, Hq, tq, _ = q.shape
    tk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    m = _additive(mask, q.dtype)
    if m is not None and m.dim() != 4:
        raise ValueError(f"tile_attention: expected a 4-D mask broadcastable to {(T, Hq, tq, tk)}, "
                         f"got {tuple(m.shape)}")
    m5 = None if m is None else _unit_last(m).unsqueeze(1)  # (B = T tiles, 1, Hq, tq, tk), broadcast dims stride 0
    q, k, v = (_unit_last(t) for t in (q, k, v))
    o, lse = _Fused.apply(q, k, v, m5, scale, _Geometry(T, 1, tq, tk), tq)
    return (o, lse) if return_lse else o


def indexed_attention(q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor, q_valid: Tensor | None,
                      mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
                      scale: float | None = None, return_lse: bool = False, k_range: Tensor | None = None,
                      mask_index: Tensor | None = None):
    """Softmax attention of query tiles to key regions read in place: ``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk,
    D[v])``; tile ``t``'s queries are positions ``q_index[t]`` and its keys ``k_index[t]`` (no gathered copies; each
    real query in exactly one valid slot, ``q_valid (T, tq)``). ``mask``: additive logits broadcastable to
    ``(B, T, Hq, tq, tk)``; ``key_padding_mask (B, Nk)`` True = keep; ``k_range (T, tq, 2)`` int32, optional: the
    key slots ``[first, last)`` outside which a query sees nothing (:func:`key_ranges` of a plan's keep mask; the
    forward then skips the columns a block of queries does not see). ``mask_index (T,)``, optional: tiles share
    masks -- ``mask (slots, Hq | 1, tq, tk)`` holds each distinct one and tile ``t`` takes slot ``mask_index[t]``
    (-1: no mask), so that a few masks are read from cache instead of one per tile from memory. Returns
    ``(B, Hq, Nq, Dv)`` (token-major memory) and with ``return_lse`` the log-sum-exp ``(B, Hq, Nq)``. The engine of
    :func:`attnlab.ops.window.tiled_attention` on CPU float32."""
    _check(q, k)
    B = q.shape[0]
    T, tq = q_index.shape
    tk = k_index.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qi, ki = (i.to(torch.int64).contiguous() for i in (q_index, k_index))
    qv = None if q_valid is None else q_valid.to(torch.uint8).contiguous()
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    m = None if mask is None else _unit_last(mask)
    sel = None
    if mask_index is not None:
        if m is None or m.dim() != 4 or tuple(mask_index.shape) != (T,):
            raise ValueError(f"indexed_attention: mask_index needs a ({T},) index and a (slots, Hq | 1, {tq}, {tk}) "
                             f"mask, got {tuple(mask_index.shape)} and "
                             f"{None if m is None else tuple(m.shape)}")
        lo, hi = (int(x) for x in mask_index.aminmax()) if T else (-1, -1)
        if lo < -1 or hi >= m.shape[0]:
            raise ValueError(f"indexed_attention: mask_index must be in [-1, {m.shape[0]}), got {lo} .. {hi}")
        sel, m = mask_index.to(torch.int32).repeat(B).contiguous(), m.unsqueeze(1)  # (slots, 1, Hq | 1, tq, tk)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    kr = None if k_range is None else k_range.to(torch.int32).contiguous()
    o, lse = _Fused.apply(q, k, v, m, scale, _Geometry(B, T, tq, tk, qi, ki, qv, kpm, kr, sel), q.shape[2])
    return (o, lse) if return_lse else o


def key_ranges(keep: Tensor) -> Tensor:
    """``keep (T, tq, tk)`` bool -> ``(T, tq, 2)`` int32: each query's first visible key slot and one past its last
    (``(0, 0)`` for a query that sees none)."""
    T, tq, tk = keep.shape
    any_ = keep.any(-1)
    first = keep.to(torch.int8).argmax(-1)
    last = tk - keep.flip(-1).to(torch.int8).argmax(-1)
    zero = torch.zeros_like(first)
    return torch.stack([torch.where(any_, first, zero), torch.where(any_, last, zero)], -1).to(torch.int32)


# ------------------------------------------------------------------- neighborhood attention (neighborhood.cpp)


# q, k and v larger than this (bytes, all three) stream from memory: the forward then prefetches each next band's
# rows into L2 a line at a time while the current band computes (when a band's keys and values leave room in L2,
# i.e. small kernels) and writes its output past the caches. On a 128 x 128 map with 8 heads of 64 (96 MB), kernel 7,
# that took the forward from ~23 ms to ~19 on 2 threads (docs/native.md); on operands that stay in the caches it
# would only cost load slots and evict the output the next layer reads.
NA_STREAM_BYTES = 32 << 20


def _na_sizes(q: Tensor, v: Tensor, kernel: tuple[int, int], dilation: tuple[int, int],
              stream: bool | None) -> Tensor:
    B, heads, D, H, W = q.shape
    if stream is None:
        stream = (2 * D + v.shape[2]) * B * heads * H * W * q.element_size() > NA_STREAM_BYTES
    return torch.tensor([B * heads, D, v.shape[2], H, W, *kernel, *dilation, heads, int(bool(stream))],
                        dtype=torch.int64)


def _check_planes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:2] != q.shape[:2] or v.shape[3:] != q.shape[3:]:
        raise ValueError("neighborhood_attention: expected q, k (B, heads, D, H, W) and v (B, heads, Dv, H, W), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bad = [t for t in (q, k, v) if t.dtype != torch.float32 or t.device.type != "cpu"]
    if bad:
        raise ValueError(f"neighborhood_attention: expected float32 CPU tensors, got {bad[0].dtype} on {bad[0].device}")


def neighborhood_supports(like: Tensor, hw: tuple[int, int], col_starts: Tensor, kernel: tuple[int, int],
                          dilation: tuple[int, int]) -> bool:
    """Whether :func:`neighborhood_attention` takes an ``hw = (H, W)`` map of ``like``'s dtype and device: float32
    on the CPU, border windows that fit the kernel's two-load permutes (``W >= 2 VL + dilation * (kernel - 1)``
    columns where windows touch a border, ``VL`` = :func:`vector_width`; at least ``VL`` in any case), and the
    kernel built."""
    if getattr(_OFF, "on", False) or like.device.type != "cpu" or like.dtype != torch.float32 or _lib() is None:
        return False
    sizes = torch.tensor([1, 1, 1, hw[0], hw[1], *kernel, *dilation, 1, 0], dtype=torch.int64)
    cs = col_starts.to(torch.int32).contiguous()
    return cs.shape == (hw[1],) and bool(_LIB.attnlab_na_supported(sizes.data_ptr(), cs.data_ptr()))


def _row_planes(B: int, heads: int, C: int, H: int, W: int, zero: bool = False) -> Tensor:
    """A ``(B, heads, C, H, W)`` result laid out as ``(B, H, heads, C, W)``: the channels of one image row are
    together, so the rows a query block reads are not a power-of-two plane size apart (they would all fall into the
    same few cache sets) and a row's tokens are one ``(heads C) x W`` matrix for the output projection."""
    t = (_POOL.zeros if zero else _POOL.empty)(B, H, heads, C, W)
    return t.permute(0, 2, 3, 1, 4)


def _na_call(fn, sizes: Tensor, ops: tuple[Tensor, ...], scale: float, rs: Tensor, cs: Tensor) -> None:
    """Call a direction of the neighborhood kernel on channel-first operands (lse, operand 4, is contiguous: its
    strides are not read)."""
    st = torch.tensor([s for i, t in enumerate(ops) for s in ((0,) * 4 if i == 4 else t.stride()[:4])],
                      dtype=torch.int64)
    ptrs = (ctypes.c_void_p * len(ops))(*[_ptr(t) for t in ops])
    if fn(sizes.data_ptr(), st.data_ptr(), ptrs, scale, rs.data_ptr(), cs.data_ptr(), torch.get_num_threads()):
        raise RuntimeError("neighborhood kernel: geometry not supported (check neighborhood_supports first)")


class _Neighborhood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rs, cs, kernel, dilation, scale, stream):
        B, heads, _, H, W = q.shape
        sizes = _na_sizes(q, v, kernel, dilation, stream)
        o = _row_planes(B, heads, v.shape[2], H, W)
        lse = _POOL.empty(B, heads, H, W)
        _na_call(_LIB.attnlab_na_forward, sizes, (q, k, v, o, lse), scale, rs, cs)
        ctx.save_for_backward(q, k, v, o, lse, rs, cs)
        ctx.sizes, ctx.scale = sizes, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, rs, cs = ctx.saved_tensors
        dq = _row_planes(*q.shape)  # written once per query
        dk, dv = _row_planes(*k.shape, zero=True), _row_planes(*v.shape, zero=True)  # added into: shared keys
        _na_call(_LIB.attnlab_na_backward, ctx.sizes, (q, k, v, o, lse, _unit_last(do), dq, dk, dv), ctx.scale,
                 rs, cs)
        return dq, dk, dv, None, None, None, None, None, None


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, row_starts: Tensor, col_starts: Tensor,
                           kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1),
                           scale: float | None = None, stream: bool | None = None) -> Tensor:
    """Neighborhood attention on channel-first operands, per query (no tiles): ``q, k (B, heads, D, H, W)``,
    ``v (B, heads, Dv, H, W)``; query ``(r, c)`` attends to the keys ``(row_starts[r] + dilation[0] * a,
    col_starts[c] + dilation[1] * b)`` for ``a < kernel[0]``, ``b < kernel[1]`` (int32 starts, e.g. from
    :func:`attnlab.ops.window.neighborhood_starts`; a 1-D sequence is ``H = 1`` with ``row_starts = [0]`` and
    ``kernel[0] = 1``). Returns ``(B, heads, Dv, H, W)``; differentiable in q, k, v. Call only when
    :func:`neighborhood_supports` is True. ``stream``: treat the operands as larger than the caches (prefetch ahead in
    software, store the output past the caches; default: when q, k and v together exceed ``NA_STREAM_BYTES``); it
    changes speed only, never results."""
    if _lib() is None:
        raise RuntimeError(f"the neighborhood kernel is {status()}")
    _check_planes(q, k, v)
    H, W = q.shape[-2:]
    rs, cs = (t.to(torch.int32).contiguous() for t in (row_starts, col_starts))
    if rs.shape != (H,) or cs.shape != (W,):
        raise ValueError(f"neighborhood_attention: expected row_starts ({H},) and col_starts ({W},), got "
                         f"{tuple(rs.shape)} and {tuple(cs.shape)}")
    for name, starts, n, kk, dd in (("row", rs, H, kernel[0], dilation[0]), ("col", cs, W, kernel[1], dilation[1])):
        if n and (int(starts.min()) < 0 or int(starts.max()) + dd * (kk - 1) >= n):
            raise ValueError(f"neighborhood_attention: {name}_starts must keep every window inside [0, {n}) "
                             f"(kernel {kk}, dilation {dd}), got starts in [{int(starts.min())}, "
                             f"{int(starts.max())}]")
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    return _Neighborhood.apply(q, k, v, rs, cs, tuple(kernel), tuple(dilation), scale, stream)


# ------------------------------------------------------------- strided products, channel attention (attnlab_gemm)


def matmul_supports(*ts: Tensor) -> bool:
    """Whether :func:`matmul` and :func:`channel_attention` take these operands: float32 CPU tensors of 4
    dimensions whose last dimension (the columns of every product's B and C) is a multiple of 16, and the kernel
    built."""
    if getattr(_OFF, "on", False) or _lib() is None:
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.shape[-1] % 16 == 0
               for t in ts)


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """``out (B, G, M, N) (+)= a (B, G, M, K) @ b (B, G, K, N)`` on strided operands, read and written in place:
    ``a`` by rows or by columns (either of its last two strides 1; a transposed view is not copied), ``b`` and
    ``out`` with unit last stride, ``N`` a multiple of 16; ``b`` may broadcast over the batch (stride 0). Not
    differentiable (a building block of :func:`channel_attention`). ``out`` is new (pooled) when not given."""
    if _lib() is None:
        raise RuntimeError(f"the native matmul is {status()}")
    if a.dim() != 4 or b.dim() != 4 or a.shape[-1] != b.shape[-2] or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"matmul: expected a (B, G, M, K) and b (B, G, K, N), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    B, G, M, K = a.shape
    N = b.shape[-1]
    if out is None:  # nothing to add to
        out, accumulate = _POOL.empty(B, G, M, N), False
    if out.shape != (B, G, M, N):
        raise ValueError(f"matmul: expected out {(B, G, M, N)}, got {tuple(out.shape)}")
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (a, b, out)) or N % 16:
        raise ValueError("matmul: expected float32 CPU operands and N a multiple of 16, got "
                         f"{a.dtype}, {b.dtype}, {out.dtype} on {a.device} with N = {N}")
    if a.stride(-1) != 1 and a.stride(-2) != 1:
        a = a.contiguous()
    b = _unit_last(b)
    if out.stride(-1) != 1:
        raise ValueError(f"matmul: out must have unit last stride, got strides {out.stride()}")
    sizes = torch.tensor([B, G, M, N, K], dtype=torch.int64)
    col = a.stride(-1) if a.stride(-2) == 1 and a.stride(-1) != 1 else 1  # read by columns (a transposed view)
    st = torch.tensor([*a.stride()[:2], a.stride(-2) if col == 1 else 1, col, *b.stride()[:3], *out.stride()[:3]],
                      dtype=torch.int64)
    ptrs = (ctypes.c_void_p * 3)(a.data_ptr(), b.data_ptr(), out.data_ptr())
    _LIB.attnlab_gemm(sizes.data_ptr(), st.data_ptr(), ptrs, int(accumulate), torch.get_num_threads())
    return out


def _token_major(like: Tensor) -> Tensor:
    """An empty ``(B, G, N, d)`` result laid out as ``(B, N, G, d)``: the token-major layout the heads merge from
    without a copy."""
    B, G, N, d = like.shape
    return _POOL.empty(B, N, G, d).transpose(1, 2)


class _ChannelAttention(torch.autograd.Function):
    """``out = V softmax(scale Q^T K)^T`` per (batch, group), every product through :func:`matmul`."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        a = matmul(q.transpose(-1, -2), k).mul_(scale).softmax(-1)  # (B, G, d, d)
        out = matmul(v, a.transpose(-1, -2).contiguous(), _token_major(v))
        ctx.save_for_backward(q, k, v, a)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, a = ctx.saved_tensors
        if do.stride(-1) != 1 and do.stride(-2) != 1:
            do = do.contiguous()
        dv = matmul(do, a, _token_major(v))  # out = V a^T: dV = dO a, da = dO^T V
        da = matmul(do.transpose(-1, -2), v)
        ds = a * (da - (da * a).sum(-1, keepdim=True)) * ctx.scale
        dq = matmul(k, ds.transpose(-1, -2).contiguous(), _token_major(q))  # s = scale Q^T K
        dk = matmul(q, ds, _token_major(k))
        return dq, dk, dv, None


def channel_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """DaViT's channel attention on ``q, k, v (B, G, N, d)``: ``out = V softmax(scale Q^T K)^T`` (channels are the
    tokens, pixels the features; ``scale`` defaults to ``d ** -0.5``), differentiable. The two products that
    reduce over or run along all ``N`` pixels go through :func:`matmul` reading the token-major projections in
    place; the result is ``(B, G, N, d)`` laid out token-major. Call when :func:`matmul_supports` is True."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"channel_attention: expected q, k, v (B, G, N, d) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ChannelAttention.apply(q, k, v, scale)
