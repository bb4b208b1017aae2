// A/B timing of the neighbourhood forward: two builds of the kernel source (NA_A, NA_B; both default to main's) and
// operand variants, alternated trial by trial in one process, so that the host's drift (10-20% within minutes here)
// falls on every variant alike (docs/native.md, "Limits", sessions 10-11). Not part of the test suite.
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 -fopenmp benchmarks/na_ab.cpp -o /tmp/na_ab
// (add -Isrc/attnlab/ops/native -DNA_B='"/path/to/copy/neighborhood.cpp"' to time a modified copy as build b)
//   /tmp/na_ab threads width kernel heads head_dim trials variant...
//
// A variant is the build's letter, a or b, then any of:
//   p<n>  n floats after each channel row (moves the rows' cache sets);  r<n>  n floats after each image row;
//   P     planar operands ((heads, d, H, W) each) instead of the module's (H, 3, heads, d, W);
//   Q, K, O   q / k and v / the output with row stride 0 (one image row, aliased: it stays in the caches);
//   k, v  k alone / v alone with row stride 0 (which operand's misses cost what);
//   M<m>  window starts mod m (k and v from a few real rows);   c  everything aliased, streaming mode off;
//   n     streaming mode off alone (plain output stores);   s<n>  k and v start n floats later (moves the columns
//         against the cache lines: s4 puts column 12 of every 16 at a line's start).
// e.g. `/tmp/na_ab 2 128 7 8 64 21 a b aK aP`. Prints each variant's median, quartiles and GFLOP/s on useful FLOPs.
#include <unistd.h>  // before the namespaces below, so that the kernel's own include of it is a no-op

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../src/attnlab/ops/native/vec.h"
#include "harness.h"

#ifndef NA_A
#define NA_A "../src/attnlab/ops/native/neighborhood.cpp"
#endif
#ifndef NA_B
#define NA_B NA_A
#endif

#define attnlab_na_supported na_supported_a
#define attnlab_na_forward na_forward_a
#define attnlab_na_backward na_backward_a
namespace build_a {
#include NA_A
}
#undef attnlab_na_supported
#undef attnlab_na_forward
#undef attnlab_na_backward
#define attnlab_na_supported na_supported_b
#define attnlab_na_forward na_forward_b
#define attnlab_na_backward na_backward_b
namespace build_b {
#include NA_B
}

typedef int (*Forward)(const int64_t*, const int64_t*, void* const*, float, const int32_t*, const int32_t*, int);

struct Variant {
    std::string name;
    Forward forward;
    int64_t pad = 0, row_pad = 0, mod = 0, shift = 0;
    bool planar = false, alias_q = false, alias_kv = false, alias_k = false, alias_v = false, alias_out = false;
    bool cached = false, no_stream = false;
    std::vector<float, Aligned<float>> qkv, out;
    std::vector<double> times;
};

Variant parse(const char* spec) {
    Variant v;
    v.name = spec;
    if (spec[0] != 'a' && spec[0] != 'b') {
        std::fprintf(stderr, "variant %s: expected a build letter a or b first\n", spec);
        std::exit(2);
    }
    v.forward = spec[0] == 'a' ? (Forward)build_a::na_forward_a : (Forward)build_b::na_forward_b;
    for (const char* s = spec + 1; *s;) {
        const char o = *s++;
        char* end;
        const int64_t n = std::strtoll(s, &end, 10);
        switch (o) {
            case 'p': v.pad = n; s = end; break;
            case 'r': v.row_pad = n; s = end; break;
            case 'M': v.mod = n; s = end; break;
            case 's': v.shift = n; s = end; break;
            case 'P': v.planar = true; break;
            case 'Q': v.alias_q = true; break;
            case 'K': v.alias_kv = true; break;
            case 'k': v.alias_k = true; break;
            case 'v': v.alias_v = true; break;
            case 'O': v.alias_out = true; break;
            case 'c': v.cached = true; break;
            case 'n': v.no_stream = true; break;
            default: std::fprintf(stderr, "variant %s: unknown option %c\n", spec, o); std::exit(2);
        }
    }
    return v;
}

int main(int argc, char** argv) {
    if (argc < 8) {
        std::fprintf(stderr, "usage: %s threads width kernel heads head_dim trials variant...\n", argv[0]);
        return 2;
    }
    const int threads = std::atoi(argv[1]);
    const int64_t n = std::atoll(argv[2]), k = std::atoll(argv[3]), heads = std::atoll(argv[4]),
                  d = std::atoll(argv[5]), h = n;
    const int trials = std::atoi(argv[6]);
    std::vector<Variant> vars;
    for (int i = 7; i < argc; ++i) vars.push_back(parse(argv[i]));
    std::vector<float, Aligned<float>> lse(heads * h * n);
    for (Variant& v : vars) {
        const int64_t ld = n + v.pad;
        v.qkv.resize(h * (3 * heads * d * ld + v.row_pad) + v.shift);
        v.out.resize(h * (heads * d * ld + v.row_pad));
        for (size_t i = 0; i < v.qkv.size(); ++i) v.qkv[i] = float((i * 2654435761u) % 1000) * 0.002f - 1.0f;
    }
    const double flops = 4.0 * k * k * d * heads * h * n;
    for (int trial = 0; trial < trials; ++trial)
        for (Variant& v : vars) {
            const int64_t ld = n + v.pad, row = 3 * heads * d * ld + v.row_pad;
            std::vector<int32_t> rows(h), cols(n);
            for (int64_t i = 0; i < h; ++i) rows[i] = window_start(i, h, k) % (v.mod ? v.mod : h);
            for (int64_t i = 0; i < n; ++i) cols[i] = window_start(i, n, k);
            float* q = v.qkv.data();
            // strides (batch, head, channel, row) of q, k, v and the output
            int64_t st[20] = {0, d * ld, ld, row, 0, d * ld, ld, row, 0, d * ld, ld, row,
                              0, d * ld, ld, heads * d * ld + v.row_pad, 0, 0, 0, 0};
            float* kv = q + v.shift;  // k and v, moved by `s`
            void* ptrs[5] = {q, kv + heads * d * ld, kv + 2 * heads * d * ld, v.out.data(), lse.data()};
            if (v.planar) {
                for (int o = 0; o < 4; ++o) st[4 * o + 1] = d * h * ld, st[4 * o + 2] = h * ld, st[4 * o + 3] = ld;
                ptrs[1] = kv + heads * d * h * ld, ptrs[2] = kv + 2 * heads * d * h * ld;
            }
            if (v.alias_q || v.cached) st[3] = 0;
            if (v.alias_kv || v.cached) st[7] = st[11] = 0;
            if (v.alias_k) st[7] = 0;
            if (v.alias_v) st[11] = 0;
            if (v.alias_out || v.cached) st[15] = 0;
            int64_t sizes[11] = {heads, d, d, h, n, k, k, 1, 1, heads, v.cached || v.no_stream ? 0 : 1};
            v.times.push_back(median_seconds(1, 3, [&] {
                v.forward(sizes, st, ptrs, 0.125f, rows.data(), cols.data(), threads);
            }));
        }
    std::printf("%lld x %lld, kernel %lld, %lld heads of %lld, %d thread(s), %d trials of 3 calls:\n", (long long)h,
                (long long)n, (long long)k, (long long)heads, (long long)d, threads, trials);
    for (Variant& v : vars) {
        std::sort(v.times.begin(), v.times.end());
        const double med = v.times[trials / 2];
        std::printf("  %-10s median %7.2f ms (quartiles %.2f-%.2f), %6.1f GFLOP/s on useful FLOPs\n", v.name.c_str(),
                    med * 1e3, v.times[trials / 4] * 1e3, v.times[3 * trials / 4] * 1e3, flops / med / 1e9);
    }
}
