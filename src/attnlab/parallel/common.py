"""What ring and tree attention share: the process group, how a sequence is laid out over it, point-to-point
shifts around the ring, a byte counter for the benchmark, and :func:`spawn_local` (a group of local processes
for tests, the benchmark and experiments).

Everything here is plain ``torch.distributed``: gloo on CPU (tested), nccl on GPU (the same calls; tensors
must then live on the GPU, which the callers guarantee by allocating like their inputs). Without an
initialised process group every function degrades to a single process (rank 0 of 1) and communicates nothing.

**Layouts.** A sequence of ``N`` tokens is split over ``P`` ranks in one of two ways:

- ``"contiguous"``: rank ``r`` holds one contiguous run, runs in rank order; any lengths (uneven ones too);
- ``"zigzag"``: the sequence is cut into ``2P`` chunks (``torch.tensor_split`` sizes) and rank ``r`` holds
  chunk ``r`` followed by chunk ``2P - 1 - r``. Under a causal mask every rank then does the same amount of
  work (a front chunk sees little, a back chunk sees a lot), which the contiguous layout does not give.

A rank's share is described by its *segments*: ``(global_start, local_start, length)`` triples, the
contiguous runs of global positions it holds, in local order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from queue import Empty
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..errors import shape_error

__all__ = [
    "LAYOUTS", "Segment", "GroupInfo", "resolve_group", "layout_segments", "chunk_bounds", "shard_sequence",
    "sequence_positions", "gather_sequence", "all_gather_ints", "comm_stats", "RingShift", "spawn_local",
]

LAYOUTS = ("zigzag", "contiguous")


class Segment(NamedTuple):
    """A contiguous run of global positions held by one rank: ``[start, start + length)`` of the sequence,
    stored at ``[local, local + length)`` of that rank's shard."""

    start: int
    local: int
    length: int


# ------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class GroupInfo:
    """A process group seen from one rank. ``group`` is what torch.distributed's calls take: ``None`` for the default
    group (or a single process without torch.distributed, ``world == 1``), else the group passed in.

    The default group is not held as an object: a GroupInfo lives on in autograd graphs (a ring attention output
    keeps its backward's configuration), and a graph still alive at interpreter exit would otherwise keep the
    default group alive after ``destroy_process_group()``, to be torn down during finalisation, where gloo's
    threads abort the process ("terminate called without an active exception": 3 runs in 37 of the
    docs/parallel.md script)."""

    group: object | None
    rank: int
    world: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (torch.distributed's point-to-point calls take global ranks)."""
        if self.group is None or self.group == dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world


def resolve_group(group=None) -> GroupInfo:
    """The group to run on: ``group``, else the default group if one is initialised, else a single process."""
    initialised = dist.is_available() and dist.is_initialized()
    if group is None:
        return GroupInfo(None, dist.get_rank(), dist.get_world_size()) if initialised else GroupInfo(None, 0, 1)
    if not initialised:
        raise ValueError("group: expected None when torch.distributed is not initialised, received a group")
    return GroupInfo(group, dist.get_rank(group), dist.get_world_size(group))


def all_gather_ints(values: Sequence[int], info: GroupInfo, device: torch.device | str = "cpu") -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), in rank order: one small all-gather."""
    if not info.distributed:
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t, group=info.group)
    _count(sent=t.numel() * t.element_size(), received=t.numel() * t.element_size() * (info.world - 1))
    return [p.tolist() for p in parts]


# ------------------------------------------------------------------------------------------------- layouts


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise shape_error("layout", f"one of {LAYOUTS}", repr(layout))


def chunk_bounds(total: int, chunks: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of ``torch.tensor_split`` of ``total`` items into ``chunks`` parts."""
    base, extra = divmod(total, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _zigzag_runs(total: int, world: int) -> list[list[tuple[int, int]]]:
    chunks = chunk_bounds(total, 2 * world)
    return [[chunks[r], chunks[2 * world - 1 - r]] for r in range(world)]


def layout_segments(lengths: Sequence[int], layout: str = "zigzag") -> list[list[Segment]]:
    """Each rank's segments, given every rank's local length (``lengths[r]``) and the layout.

    ``contiguous`` takes any lengths; ``zigzag`` requires exactly the lengths that :func:`shard_sequence` gives
    for ``N = sum(lengths)`` and raises ``ValueError`` otherwise. Empty segments are left out.
    """
    _check_layout(layout)
    world = len(lengths)
    if layout == "contiguous":
        runs, start = [], 0
        for n in lengths:
            runs.append([(start, start + n)])
            start += n
    else:
        runs = _zigzag_runs(sum(lengths), world)
        expected = [sum(e - s for s, e in rr) for rr in runs]
        if list(lengths) != expected:
            raise shape_error("zigzag layout", f"local lengths {expected} (2P = {2 * world} chunks of "
                              f"N = {sum(lengths)} tokens, rank r holding chunks r and 2P-1-r)", list(lengths))
    out = []
    for rr in runs:
        segs, local = [], 0
        for s, e in rr:
            if e > s:
                segs.append(Segment(s, local, e - s))
            local += e - s
        out.append(segs)
    return out


def shard_sequence(x: Tensor, *, rank: int, world: int, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """Rank ``rank``'s share of the full sequence ``x`` along ``dim`` (the inverse of :func:`gather_sequence`).

    ``contiguous`` gives rank ``r`` the ``r``-th of ``world`` ``tensor_split`` parts; ``zigzag`` gives it
    chunks ``r`` and ``2 * world - 1 - r`` of ``2 * world``, concatenated.
    """
    _check_layout(layout)
    if not 0 <= rank < world:
        raise shape_error("rank", f"0 <= rank < world = {world}", rank)
    n = x.shape[dim]
    runs = [chunk_bounds(n, world)[rank]] if layout == "contiguous" else _zigzag_runs(n, world)[rank]
    return torch.cat([x.narrow(dim, s, e - s) for s, e in runs], dim=dim)


def sequence_positions(segments: Sequence[Segment], device: torch.device | str = "cpu") -> Tensor:
    """Global positions ``(n_local,)`` (int64) of a rank's tokens, in local order."""
    parts = [torch.arange(s.start, s.start + s.length, device=device) for s in segments]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def gather_sequence(local: Tensor, *, group=None, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """All-gather every rank's share along ``dim`` and put the full sequence back in order (on every rank).

    Shares may have different lengths; they are padded to the longest for the all-gather and cut back.
    """
    _check_layout(layout)
    info = resolve_group(group)
    if not info.distributed:
        return local
    lengths = [n for (n,) in all_gather_ints([local.shape[dim]], info, local.device)]
    segs = layout_segments(lengths, layout)
    longest = max(lengths)
    pad = list(local.shape)
    pad[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded, group=info.group)
    _count(sent=padded.numel() * padded.element_size(),
           received=padded.numel() * padded.element_size() * (info.world - 1))
    pieces = [(seg.start, part.narrow(dim, seg.local, seg.length)) for part, ss in zip(parts, segs) for seg in ss]
    pieces.sort(key=lambda sp: sp[0])
    return torch.cat([p for _, p in pieces], dim=dim)


# ----------------------------------------------------------------------------------------- communication


_ACTIVE: list[dict] = []


def _count(sent: int = 0, received: int = 0, messages: int = 0) -> None:
    for stats in _ACTIVE:
        stats["bytes_sent"] += sent
        stats["bytes_received"] += received
        stats["messages"] += messages


@contextlib.contextmanager
def comm_stats() -> Iterator[dict]:
    """Count what this process hands to torch.distributed inside the block.

    Yields a dict ``{"bytes_sent", "bytes_received", "messages"}`` filled in as communication happens.
    Point-to-point bytes are exact; a collective counts its payload once sent and ``world - 1`` times received
    (what an ideal reduction moves per rank; the backend's algorithm may move up to twice that).
    """
    stats = {"bytes_sent": 0, "bytes_received": 0, "messages": 0}
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


class RingShift:
    """One hop around the ring: send tensors to the next rank and receive the same number from the previous
    one, asynchronously (``isend``/``irecv`` issued together with ``batch_isend_irecv``), so that the caller
    computes while the bytes move and calls :meth:`wait` only when it needs what arrived.

    ``recv_like`` gives ``(shape, dtype)`` of each tensor to receive. Empty tensors are not sent (both sides
    know the lengths, so both skip them). Each position in the lists uses its own tag, so tensors of one hop
    cannot be confused with each other.
    """

    def __init__(self, info: GroupInfo, sends: Sequence[Tensor], recv_like: Sequence[tuple[tuple, torch.dtype]],
                 device: torch.device | str, tag: int = 0) -> None:
        self.sends = [t.contiguous() for t in sends]  # kept alive until the sends complete
        self.received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv_like]
        nxt, prv = info.global_rank(info.next), info.global_rank(info.prev)
        ops = []
        for i, t in enumerate(self.sends):
            if t.numel():
                ops.append(dist.P2POp(dist.isend, _wire(t), nxt, info.group, tag + i))
                _count(sent=t.numel() * t.element_size(), messages=1)
        for i, t in enumerate(self.received):
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, _wire(t), prv, info.group, tag + i))
                _count(received=t.numel() * t.element_size())
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> list[Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        self.sends = []
        return self.received


def _wire(t: Tensor) -> Tensor:
    # Backends move bytes; bool is sent as its uint8 view (same storage) so every backend accepts it.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


# ------------------------------------------------------------------------------------ local process groups


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(fn, rank: int, world: int, port: int, args: tuple, queue, threads: int | None, backend: str,
                  timeout: float) -> None:
    if threads:
        torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: never depend on how the hostname resolves
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        dist.barrier()
        report = (rank, True, result)
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        report = (rank, False, traceback.format_exc())
    queue.put(report)  # before tearing the group down, so a root cause is reported before its echoes
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn: Callable, world: int, args: tuple = (), *, timeout: float = 120.0, threads: int | None = None,
                backend: str = "gloo", start_method: str | None = None, preload: Sequence[str] = ()) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh local processes joined in one process group.

    The group is initialised over TCP on 127.0.0.1 with a free port, and torch.distributed's own timeout is
    ``timeout``. Returns each rank's (picklable) return value, in rank order. Raises ``RuntimeError`` with the
    remote traceback if a rank fails, and ``TimeoutError`` if the ranks are not all done within ``timeout``
    seconds -- the processes are then killed, so nothing outlives the call. ``fn`` must be importable
    (module level); ``threads`` sets each process's torch thread count.

    ``start_method`` defaults to ``"forkserver"`` where it exists: a server process imports torch once and forks
    every rank from that clean state (no torch thread pool has run in it), which saves the per-rank import
    that ``"spawn"`` pays (seconds per process on a small machine); ``preload`` names more modules for the
    server to import (it takes effect when the server starts, i.e. on the first call in a process).
    """
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", "attnlab.parallel", *preload])
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_local_worker, args=(fn, r, world, port, args, queue, threads, backend, timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    results: dict[int, tuple[bool, object]] = {}
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, ok, payload = queue.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                results[rank] = (ok, payload)
            except Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # a rank died without reporting
                    break
                continue
            if not ok:  # the others may wait forever for the failed rank: collect their reports briefly, stop
                deadline = min(deadline, time.monotonic() + 2.0)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = [(r, payload) for r, (ok, payload) in results.items() if not ok]  # in order of arrival
    if failed:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failed)
        raise RuntimeError(f"spawn_local: rank {failed[0][0]} of {world} failed first:\n{text}")
    if len(results) < world:
        missing = sorted(set(range(world)) - set(results))
        codes = {r: procs[r].exitcode for r in missing}
        raise TimeoutError(f"spawn_local: ranks {missing} did not finish within {timeout:.0f} s or died without a "
                           f"report (exit codes {codes}; None = killed at the timeout)")
    return [results[r][1] for r in range(world)]
