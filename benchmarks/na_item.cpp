// Where neighbourhood attention's forward time goes (docs/native.md, "Limits"): attnlab_na_forward on the module's
// layout (q, k, v of one image row together: (H, 3, heads, d, W)), 8 heads of 64 and kernel 7 by default, timed
//   - streaming: the whole map, as the bench runs it (128 x 128: 96 MB of q, k and v, more than the caches);
//   - in cache: every image row aliased to one (row stride 0), so the same work reads a few hundred KB. The outputs
//     are garbage; the time is what the kernel's loops cost when memory is not the limit;
// each with the kernel's streaming mode off and on (the trickle of prefetches and the output stored past the caches;
// NA_STREAM_BYTES in attnlab/ops/native/__init__.py chooses it by size). Not part of the test suite; the median of 7
// trials of 5 calls.
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 -fopenmp benchmarks/na_item.cpp -o /tmp/na_item
//   /tmp/na_item [threads] [map width] [kernel] [heads] [head dim] [map height, default the width] [row padding]
// (row padding: floats after each channel's row of W, to move the rows' cache sets)
// A short map (e.g. 16 rows: 12 MB, within L3) shows whether the time goes to DRAM or to the caches nearer the core.
#include <cstdio>
#include <cstdlib>

#include "../src/attnlab/ops/native/neighborhood.cpp"
#include "harness.h"

int main(int argc, char** argv) {
    auto arg = [&](int i, int64_t fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
    const int threads = (int)arg(1, 1);
    const int64_t n = arg(2, 128), k = arg(3, 7), heads = arg(4, 8), d = arg(5, 64), h = arg(6, n), pad = arg(7, 0);
    const int64_t ld = n + pad, row = 3 * heads * d * ld;  // one image row of q, k and v
    std::vector<float, Aligned<float>> qkv(h * row), out(h * heads * d * ld), lse(heads * h * n);
    for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = float((i * 2654435761u) % 1000) * 0.002f - 1.0f;
    std::vector<int32_t> rows(h), cols(n);
    // KV_MOD=m: window starts taken mod m, so every band reads its keys and values from the same few image rows
    // (they stay in the caches) while q and the output stream as usual
    const int64_t mod = std::getenv("KV_MOD") ? std::atoll(std::getenv("KV_MOD")) : 0;
    for (int64_t i = 0; i < h; ++i) rows[i] = mod ? window_start(i, h, k) % mod : window_start(i, h, k);
    for (int64_t i = 0; i < n; ++i) cols[i] = window_start(i, n, k);
    const double flops = 4.0 * k * k * d * heads * h * n;
    std::printf("%lld x %lld, kernel %lld, %lld heads of %lld, %d thread(s):\n", (long long)h, (long long)n,
                (long long)k, (long long)heads, (long long)d, threads);
    for (int64_t sr : {row, int64_t(0)}) {
        for (int64_t stream : {0, 1}) {
            int64_t sizes[11] = {heads, d, d, h, n, k, k, 1, 1, heads, stream};
            // strides (batch, head, channel, row) of q, k, v, out; lse is contiguous
            int64_t strides[20] = {0, d * ld, ld, sr, 0, d * ld, ld, sr, 0, d * ld, ld, sr,
                                   0, d * ld, ld, sr ? heads * d * ld : 0, 0, 0, 0, 0};
            void* ptrs[5] = {qkv.data(), qkv.data() + heads * d * ld, qkv.data() + 2 * heads * d * ld, out.data(),
                             lse.data()};
            const double t = median_seconds(7, 5, [&] {
                attnlab_na_forward(sizes, strides, ptrs, 0.125f, rows.data(), cols.data(), threads);
            });
            std::printf("  %-9s stream %s: %7.2f ms, %6.1f GFLOP/s on useful FLOPs\n",
                        sr ? "streaming" : "in cache", stream ? "on " : "off", t * 1e3, flops / t / 1e9);
        }
    }
}
