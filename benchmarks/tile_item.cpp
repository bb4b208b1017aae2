// Where a 64 x 64 tile's time goes in the fused tile kernel (docs/native.md, "Limits"): one (tile, head) item of
// attnlab_tile_forward on the bench's layout (token-major q, k, v and output, 8 heads of 64), with the operands in
// cache (4 tiles) and streaming (256 tiles: a whole 128 x 128 map), next to this core's FMA peak and the kernel's own
// 64 x 64 x 64 product in L1. Needs an x86 CPU with AVX-512 (the peak loop is written in its instructions). Not part
// of the test suite.
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 -fopenmp benchmarks/tile_item.cpp -o /tmp/tile_item
//   /tmp/tile_item [threads]          # HEAD_MAJOR=1: q, k, v laid out (head, token, channel) instead
#include <cstdio>
#include <cstdlib>

#include "../src/attnlab/ops/native/tile_attention.cpp"
#include "harness.h"

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
    const long iters = 50000000;
    const double fma = median_seconds(3, 1, [&] {  // 16 independent 512-bit FMA chains
        for (long k = 0; k < iters; ++k)
            asm volatile(
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm0\n vfmadd231ps %%zmm30, %%zmm31, %%zmm1\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm2\n vfmadd231ps %%zmm30, %%zmm31, %%zmm3\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm4\n vfmadd231ps %%zmm30, %%zmm31, %%zmm5\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm6\n vfmadd231ps %%zmm30, %%zmm31, %%zmm7\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm8\n vfmadd231ps %%zmm30, %%zmm31, %%zmm9\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm10\n vfmadd231ps %%zmm30, %%zmm31, %%zmm11\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm12\n vfmadd231ps %%zmm30, %%zmm31, %%zmm13\n"
                "vfmadd231ps %%zmm30, %%zmm31, %%zmm14\n vfmadd231ps %%zmm30, %%zmm31, %%zmm15\n" ::
                    : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    });
    std::printf("FMA peak: %.1f GFLOP/s per core\n", iters * 16.0 * 32 / fma / 1e9);

    std::vector<float> A(64 * 64), B(64 * 64), C(64 * 64);
    for (size_t i = 0; i < A.size(); ++i) { A[i] = (i % 7) * 0.01f; B[i] = (i % 5) * 0.02f; }
    const double g = median_seconds(5, 20000, [&] {
        gemm(64, 64, 64, A.data(), 64, B.data(), 64, C.data(), 64, false);
        asm volatile("" ::: "memory");
    });
    std::printf("64 x 64 x 64 product in L1: %.2f us, %.1f GFLOP/s\n", g * 1e6, 2.0 * 64 * 64 * 64 / g / 1e9);

    const bool head_major = std::getenv("HEAD_MAJOR") != nullptr;
    for (int64_t T : {4, 256}) {
        const int64_t tq = 64, h = 8, d = 64, n = T * tq;
        std::vector<float> q(n * h * d), k(n * h * d), v(n * h * d), o(n * h * d), lse(n * h);
        for (size_t i = 0; i < q.size(); ++i) {
            q[i] = ((i * 37) % 101) * 0.01f - 0.5f;
            k[i] = ((i * 53) % 97) * 0.01f - 0.5f;
            v[i] = (i % 13) * 0.1f;
        }
        int64_t sizes[9] = {1, T, h, h, tq, tq, d, d, 0}, st[24] = {};
        auto set = [&](int i, int64_t sb, int64_t stt, int64_t sh, int64_t sr) {
            st[4 * i] = sb; st[4 * i + 1] = stt; st[4 * i + 2] = sh; st[4 * i + 3] = sr;
        };
        for (int i : {0, 1, 2})
            head_major ? set(i, n * h * d, tq * d, n * d, d) : set(i, n * h * d, tq * h * d, d, h * d);
        set(4, n * h * d, tq * h * d, d, h * d);
        set(5, n * h, tq * h, 1, h);
        void* ptrs[6] = {q.data(), k.data(), v.data(), nullptr, o.data(), lse.data()};
        const double s = median_seconds(5, std::max<int64_t>(3, 2000 / T), [&] {
            attnlab_tile_forward(sizes, st, ptrs, 0.125f, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, threads);
        });
        std::printf("%3ld tiles x %ld heads, %d thread(s): %.2f us per item and thread (%.1f GFLOP/s)\n", T, h,
                    threads, s / (T * h) * threads * 1e6, 4.0 * T * h * tq * tq * d / s / 1e9);
    }
}
