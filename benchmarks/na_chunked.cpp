// A measured lead for neighbourhood attention's k = 7 speed (docs/native.md, "Limits"; issue 4): the same
// per-query forward on a column-block-major layout, against the kernel on the module's layout, in one process.
//
// The module's layout keeps each channel's image row of W floats together ((H, 3, heads, d, W)), so a block of 16
// queries reads, per key row, three lines from each of 64 rows 512 bytes apart, and builds its keys by unaligned
// loads. Here every (image row, operand, head) is W / 16 chunks of d x 16 floats: a block's keys of one key row are
// three contiguous 4 KB chunks (the block's own and its neighbours), and the keys of column offset b are a
// `valignd` of two aligned loads by a shift known at compile time. What this prototype leaves out, and a kernel
// would need: border blocks (it treats every block as interior, reading clamped neighbour chunks: the same work,
// wrong values at the map's left and right edges; on the kernel that simplification was worth ~6%), kernels other
// than 7, dilation, W not a multiple of 16, the backward. It is a measurement, not a path of the library.
//
//   g++ -O3 -march=native -fno-math-errno -std=c++17 -fopenmp benchmarks/na_chunked.cpp -o /tmp/na_chunked
//   /tmp/na_chunked [threads]        interleaved medians, streaming (128 x 128, 8 heads of 64) and in cache
//   python benchmarks/na_chunked.py  the same two against dense SDPA timed in the same process (builds a .so)
#include <cstdio>
#include <cstdlib>

#include "../src/attnlab/ops/native/neighborhood.cpp"
#include "harness.h"

namespace {

constexpr int KW = 7, CENTRE = KW / 2;

// The keys of column offset B for a block from the three chunks' addresses, loading only the one or two it needs
// (key_of and shifted, the kernel's own, build them from loaded vectors).
template <int B>
inline vf key_at(const float* l, const float* m, const float* r) {
    if constexpr (B < CENTRE) return shifted<VL - CENTRE + B>(load(l), load(m));
    else if constexpr (B == CENTRE) return load(m);
    else return shifted<B - CENTRE>(load(m), load(r));
}

// One operand in chunks: channel c of columns [16 j, 16 j + 16) of (image row r, head h).
struct Chunks {
    float* p;
    int64_t row, head, chunk;
    float* at(int64_t r, int64_t h, int64_t j) const { return p + r * row + h * head + j * chunk; }
};

struct Ops {
    Chunks q, k, v, o;
    float* lse;
};

// Forward of block j (columns 16 j ..) of the band's R query rows; the next block's new chunk is prefetched into L2.
template <int R>
void chunked_block(const Geo& g, const Ops& X, int64_t h, const Band& band, int64_t j, int64_t nchunks,
                   float* const* S) {
    const int64_t jl = std::max<int64_t>(j - 1, 0), jr = std::min<int64_t>(j + 1, nchunks - 1);
    for (int64_t t = 0; t < band.nt; ++t) {  // logits, key row by key row
        const int64_t kr = band.krow[t];
        int lo, hi;
        band.rows_using(g, R, t, lo, hi);
        row_range<R>(lo, hi, [&](auto lo_, auto hi_) {
            constexpr int LO = decltype(lo_)::value, HI = decltype(hi_)::value;
            vf acc[R][KW];
            for (int i = LO; i < HI; ++i)
                for (int b = 0; b < KW; ++b) acc[i][b] = splat(0.0f);
            const float *kl = X.k.at(kr, h, jl), *km = X.k.at(kr, h, j), *kr_ = X.k.at(kr, h, jr);
            const float* kn = X.k.at(kr, h, std::min(j + 2, nchunks - 1));
            const float *x[R], *xn[R];
            for (int i = 0; i < R; ++i) {
                x[i] = X.q.at(band.r[i], h, j);
                xn[i] = X.q.at(band.r[i], h, std::min(j + 1, nchunks - 1));
            }
            for (int64_t c = 0; c < g.D; ++c) {
                __builtin_prefetch(kn + c * VL, 0, 2);
                if (t == 0)
                    for (int i = 0; i < R; ++i) __builtin_prefetch(xn[i] + c * VL, 0, 2);
                vf xv[R];
                for (int i = LO; i < HI; ++i) xv[i] = load(x[i] + c * VL);
                const vf l = load(kl + c * VL), m = in_register(load(km + c * VL)), r = load(kr_ + c * VL);
                offsets<0, KW>([&](auto b_) {
                    constexpr int b = decltype(b_)::value;
                    const vf key = in_register(key_of<KW, b>(l, m, r));
                    for (int i = LO; i < HI; ++i) acc[i][b] += xv[i] * key;
                });
            }
            for (int i = LO; i < HI; ++i)
                for (int b = 0; b < KW; ++b) store(S[i] + ((t - band.shift[i]) * KW + b) * VL, acc[i][b]);
        });
    }
    vf inv[R];
    for (int i = 0; i < R; ++i)
        inv[i] = softmax_lanes(S[i], g.kh * KW, g.scale, X.lse + (h * g.H + band.r[i]) * g.W + j * VL);
    chunks(g.Dv, [&](auto nc, int64_t c0) {  // p v, NC channels at a time
        constexpr int NC = decltype(nc)::value;
        vf acc[R][NC];
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < NC; ++c) acc[i][c] = splat(0.0f);
        for (int64_t t = 0; t < band.nt; ++t) {
            const int64_t kr = band.krow[t];
            const float *vl = X.v.at(kr, h, jl) + c0 * VL, *vm = X.v.at(kr, h, j) + c0 * VL,
                        *vr = X.v.at(kr, h, jr) + c0 * VL;
            for (int c = 0; c < NC; ++c) __builtin_prefetch(X.v.at(kr, h, std::min(j + 2, nchunks - 1)) + (c0 + c) * VL, 0, 2);
            int lo, hi;
            band.rows_using(g, R, t, lo, hi);
            row_range<R>(lo, hi, [&](auto lo_, auto hi_) {
                constexpr int LO = decltype(lo_)::value, HI = decltype(hi_)::value;
                const float* pt[R];
                for (int i = LO; i < HI; ++i) pt[i] = S[i] + (t - band.shift[i]) * KW * VL;
                offsets<0, KW>([&](auto b_) {
                    constexpr int b = decltype(b_)::value;
                    vf p[R];
                    for (int i = LO; i < HI; ++i) p[i] = load(pt[i] + b * VL);
                    for (int c = 0; c < NC; ++c) {
                        const vf key = in_register(key_at<b>(vl + c * VL, vm + c * VL, vr + c * VL));
                        for (int i = LO; i < HI; ++i) acc[i][c] += p[i] * key;
                    }
                });
            });
        }
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < NC; ++c) store(X.o.at(band.r[i], h, j) + (c0 + c) * VL, acc[i][c] * inv[i]);
    });
}

void chunked_forward(const Geo& g, const Ops& X, int threads) {
    const std::vector<std::pair<int64_t, int>> bands = row_bands(g);
    const int64_t nchunks = g.W / VL, nbands = (int64_t)bands.size();
    parallel(g.BH * nbands, threads, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(MAXR * g.kh * KW * VL);
        float* S[MAXR];
        for (int i = 0; i < MAXR; ++i) S[i] = buf.data() + i * g.kh * KW * VL;
        Band band;
        for (int64_t it = begin; it < end; ++it) {
            const int64_t h = it / nbands, k = it % nbands;
            make_band(g, bands[k].second, bands[k].first, band);
            for (int64_t j = 0; j < nchunks; ++j)
                with_rows(bands[k].second, [&](auto rows) {
                    chunked_block<decltype(rows)::value>(g, X, h, band, j, nchunks, S);
                });
        }
    });
}

// 128 x 128, 8 heads of 64, batch 1: q, k, v of one image row together (96 MB), as the bench's row.
struct Problem {
    static constexpr int64_t n = 128, heads = 8, d = 64, h = 128, row = 3 * heads * d * n;
    std::vector<float, Aligned<float>> qkv, out, lse;
    std::vector<int32_t> rows, cols;
    Problem() : qkv(h * row), out(h * heads * d * n), lse(heads * h * n), rows(h), cols(n) {
        for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = float((i * 2654435761u) % 1000) * 0.002f - 1.0f;
        for (int64_t i = 0; i < h; ++i) rows[i] = window_start(i, h, KW);
        for (int64_t i = 0; i < n; ++i) cols[i] = window_start(i, n, KW);
    }
    // sr: the image row stride (0: every row aliased to one, so the operands stay in cache)
    void kernel(int threads, int64_t sr) {
        int64_t sizes[11] = {heads, d, d, h, n, KW, KW, 1, 1, heads, 1};
        int64_t strides[20] = {0, d * n, n, sr, 0, d * n, n, sr, 0, d * n, n, sr,
                               0, d * n, n, sr ? heads * d * n : 0, 0, 0, 0, 0};
        void* ptrs[5] = {qkv.data(), qkv.data() + heads * d * n, qkv.data() + 2 * heads * d * n, out.data(),
                         lse.data()};
        attnlab_na_forward(sizes, strides, ptrs, 0.125f, rows.data(), cols.data(), threads);
    }
    void chunked(int threads, int64_t sr) {
        int64_t sizes[11] = {heads, d, d, h, n, KW, KW, 1, 1, heads, 1};
        const Geo g = geometry(sizes, rows.data(), cols.data(), 0.125f);
        auto op = [&](float* p, int64_t rs) { return Chunks{p, rs, d * n, d * VL}; };
        const Ops X{op(qkv.data(), sr), op(qkv.data() + heads * d * n, sr), op(qkv.data() + 2 * heads * d * n, sr),
                    op(out.data(), sr ? heads * d * n : 0), lse.data()};
        chunked_forward(g, X, threads);
    }
};

Problem& problem() {
    static Problem p;
    return p;
}

}  // namespace

extern "C" {
double na_chunked_flops() { return 4.0 * KW * KW * Problem::d * Problem::heads * Problem::h * Problem::n; }
void na_chunked_kernel(int threads) { problem().kernel(threads, Problem::row); }
void na_chunked_prototype(int threads) { problem().chunked(threads, Problem::row); }
}

#ifndef NA_CHUNKED_LIBRARY
int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
    Problem& p = problem();
    const double flops = na_chunked_flops();
    std::printf("128 x 128, kernel 7, 8 heads of 64, %d thread(s); median of 7 trials of 5 calls\n", threads);
    for (int round = 0; round < 3; ++round)
        for (int64_t sr : {Problem::row, int64_t(0)}) {
            const double a = median_seconds(7, 5, [&] { p.kernel(threads, sr); });
            const double b = median_seconds(7, 5, [&] { p.chunked(threads, sr); });
            std::printf("  %-9s kernel %6.2f ms (%5.1f GFLOP/s)   chunked prototype %6.2f ms (%5.1f GFLOP/s)\n",
                        sr ? "streaming" : "in cache", a * 1e3, flops / a / 1e9, b * 1e3, flops / b / 1e9);
        }
}
#endif
