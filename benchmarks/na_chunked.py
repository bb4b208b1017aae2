"""Neighbourhood attention k = 7 on the module's layout and on the column-block-major prototype
(``na_chunked.cpp``, which says what the prototype leaves out), each as a fraction of dense SDPA's GFLOP/s timed in
the same process, round by round as ``local_speed.py`` does (SDPA right before and right after each pair).

    python benchmarks/na_chunked.py [--rounds 7] [--threads 2]

Builds ``na_chunked.cpp`` into a temporary shared library with g++; not part of the test suite."""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent


def build(tmp: pathlib.Path) -> ctypes.CDLL:
    lib = tmp / "na_chunked.so"
    subprocess.run(["g++", "-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fopenmp", "-shared", "-fPIC",
                    "-DNA_CHUNKED_LIBRARY", str(HERE / "na_chunked.cpp"), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))
    so.na_chunked_flops.restype = ctypes.c_double
    return so


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        so = build(pathlib.Path(tmp))
        flops = so.na_chunked_flops()
        q, k, v = (torch.randn(1, 8, 8192, 64) for _ in range(3))  # the bench's dense reference: N = 8192, 8 x 64
        dense_flops = 4.0 * 8 * 8192 * 8192 * 64
        dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        ratios: dict[str, list[float]] = {"kernel": [], "prototype": []}
        print(f"128 x 128, kernel 7, 8 heads of 64, {args.threads} threads; GF/s on useful FLOPs")
        for r in range(args.rounds):
            before = dense_flops / seconds(dense, 1) / 1e9
            kern = flops / seconds(lambda: so.na_chunked_kernel(args.threads), 3) / 1e9
            proto = flops / seconds(lambda: so.na_chunked_prototype(args.threads), 3) / 1e9
            ref = (before + dense_flops / seconds(dense, 1) / 1e9) / 2
            ratios["kernel"].append(kern / ref)
            ratios["prototype"].append(proto / ref)
            print(f"  round {r}: dense SDPA {ref:5.1f}   kernel {kern:5.1f} ({kern / ref:4.0%})   "
                  f"chunked prototype {proto:5.1f} ({proto / ref:4.0%})")
        print("median vs SDPA: " + ", ".join(f"{name} {statistics.median(x):.0%}" for name, x in ratios.items()))


if __name__ == "__main__":
    main()
