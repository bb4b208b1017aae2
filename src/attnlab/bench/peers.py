"""Peers suite: other libraries' implementations of the same mechanisms, run beside attnlab's on the same inputs.

Each peer is optional. When its package is missing the run records one ``skipped`` line saying what to install;
``make`` installs all of them (fla-core and NATTEN with ``--no-deps``, so that torch is never replaced).

- NATTEN (``natten.na2d``, its CPU path: eager flex attention, forward only) vs attnlab's neighborhood attention
  core (``neighborhood-attention-fast``): 2-D map, kernel 7, 4 heads of 32 (the issue's setting).
- lucidrains' ``local-attention`` (``LocalAttention`` with ``exact_windowsize=True``, causal, no rotary) vs
  attnlab's causal sliding-window band (``sliding-window``): each query sees itself and the ``window`` keys before.
- fla-core's pure-PyTorch naive references vs attnlab's linear-attention scan: ``naive_recurrent_linear_attn``
  (elu+1 features, normalised; ``linear-attention``) and ``naive_parallel_based`` (2nd-order Taylor; ``based``).
- The official BiFormer (github.com/rayleizhu/BiFormer, not a package and never vendored here): its bi-level routing
  attention modules are imported at run time from a checkout the user names (``--biformer-src DIR`` or
  ``ATTNLAB_BIFORMER_SRC``) and run beside attnlab's ``biformer`` with the same weights on the same 56x56 map,
  together with dense SDPA on the same tokens (:func:`biformer_official`).

Records: ``time_s`` for both sides (config ``side`` = "attnlab" / the peer), ``speed_vs_peer`` (peer time / ours)
and ``max_abs_diff`` of the outputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Callable

import torch

from .harness import make_record, time_interleaved

Progress = Callable[[str], None]


def _fla_naive(name: str):
    """fla's ``fla/ops/<name>/naive.py`` loaded by path (``import fla.ops`` needs triton, the naive files do not)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / name / "naive.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location(f"attnlab_peer_fla_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _pair(mechanism: str, peer: str, cfg: dict, ours: Callable, theirs: Callable, repeats: int) -> list[dict]:
    with torch.no_grad():
        out_ours, out_peer = ours(), theirs()
        t = time_interleaved({"ours": ours, "theirs": theirs}, repeats=repeats)
        t_ours, t_peer = t["ours"], t["theirs"]
    diff = (out_ours.float() - out_peer.float()).abs().max().item()
    return [
        make_record("peers", mechanism, {**cfg, "side": "attnlab"}, "time_s", t_ours["median"], "s",
                    min=t_ours["min"], max=t_ours["max"]),
        make_record("peers", mechanism, {**cfg, "side": peer}, "time_s", t_peer["median"], "s",
                    min=t_peer["min"], max=t_peer["max"]),
        make_record("peers", mechanism, {**cfg, "peer": peer}, "speed_vs_peer", t_peer["median"] / t_ours["median"],
                    "x"),
        make_record("peers", mechanism, {**cfg, "peer": peer}, "max_abs_diff", diff, ""),
    ]


def natten_neighborhood(side: int = 64, kernel: int = 7, heads: int = 4, head_dim: int = 32,
                        repeats: int = 3) -> list[dict]:
    cfg = {"peer": "natten", "hw": [side, side], "kernel": kernel, "heads": heads, "head_dim": head_dim,
           "pass": "fwd"}
    if importlib.util.find_spec("natten") is None:
        return [make_record("peers", "neighborhood-attention-fast", cfg, "skipped", None,
                            note="NATTEN is not installed: pip install --no-deps --no-build-isolation natten")]
    import natten

    from ..mechanisms.local import _na_plan
    from ..ops.window import tiled_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, side, side, heads, head_dim, generator=g) for _ in range(3))
    flat = [t.reshape(1, -1, heads, head_dim).transpose(1, 2).contiguous() for t in (q, k, v)]
    plan = _na_plan((side, side), (kernel, kernel), (1, 1), False, (3, 3))

    def ours():
        return tiled_attention(*flat, plan).transpose(1, 2).reshape(q.shape)

    def theirs():
        return natten.na2d(q, k, v, kernel_size=kernel)

    return _pair("neighborhood-attention-fast", "natten", cfg, ours, theirs, repeats)


def lucidrains_local(n: int = 4096, window: int = 256, heads: int = 4, head_dim: int = 64,
                     repeats: int = 3) -> list[dict]:
    cfg = {"peer": "local-attention", "n": n, "window": window, "heads": heads, "head_dim": head_dim,
           "causal": True, "pass": "fwd"}
    if importlib.util.find_spec("local_attention") is None:
        return [make_record("peers", "sliding-window", cfg, "skipped", None,
                            note="local-attention is not installed: pip install local-attention")]
    from local_attention import LocalAttention

    from ..ops.window import band_plan, tiled_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
    peer = LocalAttention(window_size=window, causal=True, look_backward=1, look_forward=0, exact_windowsize=True,
                          use_rotary_pos_emb=False)
    plan = band_plan(n, n, window, 0)
    return _pair("sliding-window", "local-attention", cfg, lambda: tiled_attention(q, k, v, plan),
                 lambda: peer(q, k, v), repeats)


def fla_linear(n: int = 2048, heads: int = 4, head_dim: int = 64, repeats: int = 3) -> list[dict]:
    from ..ops.linear import elu_plus_one, linear_attention, taylor_features

    out: list[dict] = []
    g = torch.Generator().manual_seed(0)
    for mechanism, name in (("linear-attention", "linear_attn"), ("based", "based")):
        d = 16 if mechanism == "based" else head_dim  # Based's Taylor features use a small feature dimension
        cfg = {"peer": "fla", "n": n, "heads": heads, "head_dim": d, "causal": True, "pass": "fwd"}
        fla = _fla_naive(name)
        if fla is None:
            out.append(make_record("peers", mechanism, cfg, "skipped", None,
                                   note="fla-core is not installed: pip install --no-deps fla-core"))
            continue
        q, k, v = (torch.randn(1, n, heads, d, generator=g) for _ in range(3))
        if mechanism == "linear-attention":
            fq, fk = elu_plus_one(q), elu_plus_one(k)
            qh, kh, vh = (t.transpose(1, 2) for t in (fq, fk, v))

            def ours():
                return linear_attention(qh, kh, vh, causal=True, eps=1e-10).transpose(1, 2)

            def theirs():
                return fla.naive_recurrent_linear_attn(fq, fk, v, scale=1.0, normalize=True)[0]
        else:
            qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            s = d ** -0.25

            def ours():
                return linear_attention(taylor_features(qh * s, 2), taylor_features(kh * s, 2), vh, causal=True,
                                        eps=1e-6)

            def theirs():
                return fla.naive_parallel_based(qh, kh, vh, use_norm=True)

        out += _pair(mechanism, "fla", cfg, ours, theirs, repeats)
    return out


# ------------------------------------------------------------------------------------------ official BiFormer

BIFORMER_ENV = "ATTNLAB_BIFORMER_SRC"
BIFORMER_HOWTO = (f"git clone https://github.com/rayleizhu/BiFormer DIR, then run attnlab bench peers --biformer-src DIR "
                  f"(or set {BIFORMER_ENV}=DIR); it needs einops only")
BIFORMER_LEGACY = "ops/bra_legacy.py"  # BiLevelRoutingAttention: the module the released BiFormer models use
BIFORMER_NCHW = ("ops/bra_nchw.py", "ops/torch/rrsda.py")  # nchwBRA, the refactored module, and its attention core


class PeerUnavailable(RuntimeError):
    """A peer cannot be loaded; the message says why and how to get it."""


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # an import inside the peer failed (missing einops, a changed file): say which
        raise PeerUnavailable(f"importing the official BiFormer file {path} failed: {type(e).__name__}: {e}") from e
    return mod


def load_biformer(src: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """The official BiFormer modules, imported by file path from a checkout of rayleizhu/BiFormer.

    ``src`` (else ``$ATTNLAB_BIFORMER_SRC``) is the checkout's root. Returns ``SimpleNamespace(root, legacy, nchw)``:
    ``legacy`` is ``ops/bra_legacy.py`` (required), ``nchw`` is ``ops/bra_nchw.py`` or None when absent. The nchw
    file imports its core as ``ops.torch.rrsda``; that name is bound to the core loaded by path only while the file
    executes (a top-level package ``ops`` is not put on ``sys.path``). Raises :class:`PeerUnavailable` with what
    is wrong and how to get the source.
    """
    given = src if src not in (None, "") else os.environ.get(BIFORMER_ENV) or None
    if given is None:
        raise PeerUnavailable(f"the official BiFormer source is not given: {BIFORMER_HOWTO}")
    root = Path(given).expanduser()
    if not root.is_dir():
        raise PeerUnavailable(f"the official BiFormer source '{given}' is not a directory: {BIFORMER_HOWTO}")
    if not (root / BIFORMER_LEGACY).is_file():
        raise PeerUnavailable(f"'{given}' has no {BIFORMER_LEGACY}; expected the root of a checkout of "
                              f"rayleizhu/BiFormer: {BIFORMER_HOWTO}")
    legacy = _load_file("attnlab_peer_biformer_bra_legacy", root / BIFORMER_LEGACY)
    nchw = None
    if all((root / f).is_file() for f in BIFORMER_NCHW):
        core = _load_file("attnlab_peer_biformer_rrsda", root / BIFORMER_NCHW[1])
        names = ("ops", "ops.torch", "ops.torch.rrsda")
        saved = {n: sys.modules.get(n) for n in names}
        sys.modules.update({"ops": types.ModuleType("ops"), "ops.torch": types.ModuleType("ops.torch"),
                            "ops.torch.rrsda": core})
        try:
            nchw = _load_file("attnlab_peer_biformer_bra_nchw", root / BIFORMER_NCHW[0])
        finally:
            for n, m in saved.items():
                if m is None:
                    sys.modules.pop(n, None)
                else:
                    sys.modules[n] = m
    return types.SimpleNamespace(root=root, legacy=legacy, nchw=nchw)


def _share_biformer_weights(ours: torch.nn.Module, legacy: torch.nn.Module, nchw: torch.nn.Module | None) -> None:
    """Copy the official legacy module's weights into attnlab's biformer (and the nchw module).

    The official fused projection ``qkv`` is ``Linear(C, 3C)`` with rows ``[q | k | v]``, each ``(heads head_dim)``
    head-major like attnlab's ``q_proj``/``k_proj``/``v_proj``; ``wo`` is the output projection and ``lepe`` the
    depthwise convolution on V (channels in the same order). nchwBRA holds the same weights as 1x1 convolutions.
    """
    c = ours.heads * ours.head_dim
    w, b = legacy.qkv.qkv.weight, legacy.qkv.qkv.bias
    with torch.no_grad():
        for i, lin in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            lin.weight.copy_(w[i * c:(i + 1) * c])
            lin.bias.copy_(b[i * c:(i + 1) * c])
        ours.o_proj.weight.copy_(legacy.wo.weight)
        ours.o_proj.bias.copy_(legacy.wo.bias)
        ours.lepe.weight.copy_(legacy.lepe.weight)
        ours.lepe.bias.copy_(legacy.lepe.bias)
        if nchw is not None:
            nchw.qkv_linear.weight.copy_(w[:, :, None, None])
            nchw.qkv_linear.bias.copy_(b)
            nchw.output_linear.weight.copy_(legacy.wo.weight[:, :, None, None])
            nchw.output_linear.bias.copy_(legacy.wo.bias)
            nchw.lepe.weight.copy_(legacy.lepe.weight)
            nchw.lepe.bias.copy_(legacy.lepe.bias)


def biformer_official(src: str | os.PathLike | None = None, side: int = 56, n_win: int = 8, topk: int = 4,
                      dim: int = 64, heads: int = 2, side_dwconv: int = 5, repeats: int = 5,
                      threads: tuple[int | None, ...] = (None, 1)) -> list[dict]:
    """attnlab's ``biformer`` beside the official BiFormer modules and dense SDPA on one ``side x side`` map.

    Defaults: the paper's stage-1 map of a 224 image (56x56 tokens), 8 regions per side and top-4 (the target
    setting of attnlab's issue; the released BiFormer-T/S configs use 7 regions per side and top-1 at stage 1),
    stage-1 width 64 with head_dim 32 (2 heads) and LePE kernel 5, as in the official BiFormer-T/S configs.
    Like for like: attnlab runs with the official scale ``dim ** -0.5`` (its default is ``head_dim ** -0.5``) and
    the official weights; the official legacy module runs with ``kv_downsample_mode="identity"`` (the released
    models' setting) and no routing parameters. Module level: the whole layer (projections, routing, attention,
    LePE, output), attnlab vs the official legacy module, the official nchw module (when present) and the dense
    ``mha`` layer (same width, SDPA core). Core level: attnlab's routing + gathered attention vs SDPA on the same
    q/k/v (no projections, no LePE). Forward only, no grad, fp32.

    Each entry of ``threads`` is one timing run with that many torch threads (None = the process's setting),
    recorded in the config: on a loaded machine, multi-threaded runs of many small kernels measure thread
    hand-offs more than the algorithm, so a single-thread run is kept beside the default one.
    """
    from .. import create

    n = side * side
    cfg = {"peer": "biformer-official", "hw": [side, side], "n_win": n_win, "topk": topk, "dim": dim, "heads": heads,
           "side_dwconv": side_dwconv, "qk_scale": "dim**-0.5", "level": "module", "pass": "fwd"}
    try:
        off = load_biformer(src)
    except PeerUnavailable as e:
        return [make_record("peers", "biformer", cfg, "skipped", None, note=str(e))]
    torch.manual_seed(0)
    legacy = off.legacy.BiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv,
                                                kv_downsample_mode="identity").eval()
    nchw = None if off.nchw is None else off.nchw.nchwBRA(dim, num_heads=heads, n_win=n_win, topk=topk,
                                                          side_dwconv=side_dwconv).eval()
    ours = create("biformer", dim=dim, heads=heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv,
                  qk_scale=dim ** -0.5).eval()
    dense = create("mha", dim=dim, heads=heads).eval()
    _share_biformer_weights(ours, legacy, nchw)
    g = torch.Generator().manual_seed(0)
    x_map = torch.randn(1, side, side, dim, generator=g)  # NHWC, the legacy module's layout
    x = x_map.reshape(1, n, dim)
    x_nchw = x_map.permute(0, 3, 1, 2)  # a channels-last NCHW view, the layout nchwBRA recommends
    hw = (side, side)
    with torch.no_grad():
        q, k, v = ours.project(x, hw=hw)
    fns = {"attnlab": lambda: ours(x, hw=hw), "biformer-official": lambda: legacy(x_map), "sdpa": lambda: dense(x)}
    if nchw is not None:
        fns["biformer-official-nchw"] = lambda: nchw(x_nchw).permute(0, 2, 3, 1)
    core = {"attnlab": lambda: ours.fast(q, k, v, causal=False, key_padding_mask=None, hw=hw),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=ours.qk_scale)}
    with torch.no_grad():
        ref = fns["attnlab"]().reshape(x_map.shape)
        diffs = {p: (fns[p]().reshape(x_map.shape) - ref).abs().max().item()
                 for p in fns if p.startswith("biformer-official")}

    def timing(c: dict, side_: str, tt: dict) -> dict:
        return make_record("peers", "biformer", {**c, "side": side_}, "time_s", tt[side_]["median"], "s",
                           min=tt[side_]["min"], max=tt[side_]["max"], repeats=tt[side_]["repeats"])

    out: list[dict] = []
    default_threads = torch.get_num_threads()
    for n_threads in threads:
        torch.set_num_threads(n_threads or default_threads)
        try:
            with torch.no_grad():
                t, tc = time_interleaved(fns, repeats=repeats), time_interleaved(core, repeats=repeats)
        finally:
            torch.set_num_threads(default_threads)
        for level, times in (("module", t), ("core", tc)):
            for peer in times:
                if peer == "attnlab":
                    continue
                c = {**cfg, "peer": peer, "level": level, "threads": n_threads or default_threads}
                out += [timing(c, "attnlab", times), timing(c, peer, times),
                        make_record("peers", "biformer", c, "speed_vs_peer",
                                    times[peer]["median"] / times["attnlab"]["median"], "x")]
                if peer in diffs:  # the outputs do not depend on the thread count: one check, repeated per row
                    out.append(make_record("peers", "biformer", c, "max_abs_diff", diffs[peer], "",
                                           max_abs_output=ref.abs().max().item()))
    return out


def run_peers(quick: bool = True, progress: Progress | None = None,
              biformer_src: str | os.PathLike | None = None) -> list[dict]:
    records: list[dict] = []
    if progress:
        progress("natten vs neighborhood-attention-fast")
    records += natten_neighborhood(repeats=2 if quick else 5)
    if progress:
        progress("local-attention vs sliding-window")
    records += lucidrains_local(n=4096 if quick else 16384, repeats=2 if quick else 5)
    if progress:
        progress("fla naive vs linear-attention, based")
    records += fla_linear(n=2048 if quick else 8192, repeats=2 if quick else 5)
    if progress:
        progress("official BiFormer vs biformer, SDPA")
    records += biformer_official(biformer_src, repeats=7 if quick else 21)
    return records
