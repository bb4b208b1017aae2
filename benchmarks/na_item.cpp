// Where neighbourhood attention's forward time goes (docs/native.md, "Limits"): attnlab_na_forward on the module's
// layout (q, k, v of one image row together: (H, 3, heads, d, W)), 8 heads of 64 and kernel 7 by default, timed
//   - streaming: the whole map, as the bench runs it (128 x 128: 96 MB of q, k and v, more than the caches);
//   - in cache: every image row aliased to one (row stride 0), so the same work reads a few hundred KB. The outputs
//     are garbage; the time is what the kernel's loops cost when memory is not the limit;
// each with and without the software prefetches (NA_PREFETCH_BYTES in attnlab/ops/native/__init__.py chooses them
// by size). Not part of the test suite; the median of 7 trials of 5 calls.
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 -fopenmp benchmarks/na_item.cpp -o /tmp/na_item
//   /tmp/na_item [threads] [map width] [kernel] [heads] [head dim] [map height, default the width]
// A short map (e.g. 16 rows: 12 MB, within L3) shows whether the time goes to DRAM or to the caches nearer the core.
#include <cstdio>
#include <cstdlib>
#include <new>

#include "../src/attnlab/ops/native/neighborhood.cpp"
#include "median.h"

namespace {
template <class T>
struct Aligned {  // a std::allocator on 64-byte boundaries
    using value_type = T;
    Aligned() = default;
    template <class U> Aligned(const Aligned<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const Aligned<U>&) const { return true; }
    template <class U> bool operator!=(const Aligned<U>&) const { return false; }
};

int32_t window_start(int64_t i, int64_t n, int64_t k) {  // the window keeps its size and shifts inward at borders
    return (int32_t)std::min<int64_t>(std::max<int64_t>(i - k / 2, 0), n - k);
}
}  // namespace

int main(int argc, char** argv) {
    auto arg = [&](int i, int64_t fallback) { return argc > i ? std::atoll(argv[i]) : fallback; };
    const int threads = (int)arg(1, 1);
    const int64_t n = arg(2, 128), k = arg(3, 7), heads = arg(4, 8), d = arg(5, 64), h = arg(6, n);
    const int64_t row = 3 * heads * d * n;  // one image row of q, k and v
    // On cache lines, as PyTorch allocates (a std::vector's large buffer starts 16 bytes into a page: every row then
    // straddles lines, and streaming took twice as long)
    std::vector<float, Aligned<float>> qkv(h * row), out(h * heads * d * n), lse(heads * h * n);
    for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = float((i * 2654435761u) % 1000) * 0.002f - 1.0f;
    std::vector<int32_t> rows(h), cols(n);
    for (int64_t i = 0; i < h; ++i) rows[i] = window_start(i, h, k);
    for (int64_t i = 0; i < n; ++i) cols[i] = window_start(i, n, k);
    const double flops = 4.0 * k * k * d * heads * h * n;
    std::printf("%lld x %lld, kernel %lld, %lld heads of %lld, %d thread(s):\n", (long long)h, (long long)n,
                (long long)k, (long long)heads, (long long)d, threads);
    for (int64_t sr : {row, int64_t(0)}) {
        for (int64_t prefetch : {0, 1}) {
            int64_t sizes[11] = {heads, d, d, h, n, k, k, 1, 1, heads, prefetch};
            // strides (batch, head, channel, row) of q, k, v, out; lse is contiguous
            int64_t strides[20] = {0, d * n, n, sr, 0, d * n, n, sr, 0, d * n, n, sr,
                                   0, d * n, n, sr ? heads * d * n : 0, 0, 0, 0, 0};
            void* ptrs[5] = {qkv.data(), qkv.data() + heads * d * n, qkv.data() + 2 * heads * d * n, out.data(),
                             lse.data()};
            const double t = median_seconds(7, 5, [&] {
                attnlab_na_forward(sizes, strides, ptrs, 0.125f, rows.data(), cols.data(), threads);
            });
            std::printf("  %-9s prefetch %s: %7.2f ms, %6.1f GFLOP/s on useful FLOPs\n",
                        sr ? "streaming" : "in cache", prefetch ? "on " : "off", t * 1e3, flops / t / 1e9);
        }
    }
}
