// Fused softmax attention over many small tiles, on the CPU (fp32), forward and backward.
//
// Window, block, halo and neighbourhood mechanisms attend within small tiles (64 queries x 64..256 keys). PyTorch's
// SDPA runs such problems at about a third of its dense rate: its blocked kernel is built for long sequences, and
// every tile pays for BLAS calls on matrices too small to amortise them. This kernel does one tile per work item
// entirely in a per-thread workspace that stays in L1/L2: logits = q k^T (register-blocked), softmax in place, then
// p v; the backward recomputes p from the saved log-sum-exp (the flash-attention recurrences, one block per tile).
//
// Built once per machine by attnlab/ops/native/__init__.py (g++ -O3 -march=native) and called through ctypes; no
// PyTorch headers. Layout: every operand is a strided (tile, head, row, column) array with unit column stride.
// GCC vector extensions give 16-float vectors that compile to AVX-512, AVX2 or SSE, whatever the machine has.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int VL = 16;  // floats per vector

inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline int64_t round_up(int64_t n) { return (n + VL - 1) / VL * VL; }

// exp(x) for a vector: 2^n * e^f with n = round(x log2 e), |f| <= ln2 / 2, e^f by its degree-6 Taylor polynomial
// (relative error below 2e-7). Inputs below -87.3 (including -inf) give exactly 0; softmax never passes x > 0.
inline vf vexp(vf x) {
    const vf lo = splat(-87.3f);
    vi zero = x < lo;
    x = zero ? lo : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf f = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln 2 split in two for accuracy
    vf p = splat(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &e, sizeof scale);
    p = p * scale;
    return zero ? splat(0.0f) : p;
}

// Horizontal max and sum by halving (four shuffles instead of sixteen element extractions).
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
#define HALVE(v, op)                                                                                         \
    v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));         \
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));         \
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));         \
    v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14))
inline vf vadd(vf a, vf b) { return a + b; }
inline float hmax(vf v) { HALVE(v, vmax); return v[0]; }
inline float hsum(vf v) { HALVE(v, vadd); return v[0]; }
#undef HALVE

// C[M x N] (+)= A[M x K] B[K x N]; N a multiple of VL. A is read one scalar at a time (any row stride), B and C by
// rows of vectors. The micro-kernel keeps an MR x NV block of C in registers across the whole K loop.
template <int MR, int NV>
inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                  bool accumulate) {
    vf c[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? load(C + r * ldc + v * VL) : splat(0.0f);
    for (int64_t k = 0; k < K; ++k) {
        vf b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * VL);
        for (int r = 0; r < MR; ++r) {
            vf a = splat(A[r * lda + k]);
            for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

template <int NV>
inline void rows_block(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool acc) {
    constexpr int MR = NV <= 2 ? 8 : 6;  // MR * NV accumulators + NV + 1 vectors fit 32 AVX-512 registers
    int64_t i = 0;
    for (; i + MR <= M; i += MR) micro<MR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
    switch (M - i) {  // the last rows
        case 7: micro<7, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 6: micro<6, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 5: micro<5, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 4: micro<4, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 3: micro<3, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 2: micro<2, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        case 1: micro<1, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc); break;
        default: break;
    }
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
    int64_t j = 0;
    for (; j + 4 * VL <= N; j += 4 * VL) rows_block<4>(M, K, A, lda, B + j, ldb, C + j, ldc, acc);
    switch ((N - j) / VL) {
        case 3: rows_block<3>(M, K, A, lda, B + j, ldb, C + j, ldc, acc); break;
        case 2: rows_block<2>(M, K, A, lda, B + j, ldb, C + j, ldc, acc); break;
        case 1: rows_block<1>(M, K, A, lda, B + j, ldb, C + j, ldc, acc); break;
        default: break;
    }
}

// 16 x 16 transpose in registers: level b swaps bit b of the row and the column index (rows i and i + b exchange
// their blocks of b elements); after the four levels element (r, c) is at (c, r).
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
inline void transpose16(vf* r) {
    for (int i = 0; i < 16; ++i) if (!(i & 8)) { vf a = r[i], b = r[i + 8];
        r[i] = SHUF(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        r[i + 8] = SHUF(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31); }
    for (int i = 0; i < 16; ++i) if (!(i & 4)) { vf a = r[i], b = r[i + 4];
        r[i] = SHUF(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
        r[i + 4] = SHUF(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31); }
    for (int i = 0; i < 16; ++i) if (!(i & 2)) { vf a = r[i], b = r[i + 2];
        r[i] = SHUF(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
        r[i + 2] = SHUF(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31); }
    for (int i = 0; i < 16; ++i) if (!(i & 1)) { vf a = r[i], b = r[i + 1];
        r[i] = SHUF(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
        r[i + 1] = SHUF(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31); }
}
#undef SHUF

// dst[cols x ldd] = src[rows x cols]^T with ldd = round_up(rows): columns rows..ldd are zero (padding keys
// contribute nothing). Whole 16 x 16 blocks in registers; edge blocks through a zero-padded copy.
void transpose(const float* src, int64_t ss, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
    vf r[16];
    for (int64_t r0 = 0; r0 < rows; r0 += VL) {
        const int64_t nr = std::min<int64_t>(VL, rows - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += VL) {
            const int64_t nc = std::min<int64_t>(VL, cols - c0);
            const float* s = src + r0 * ss + c0;
            if (nr == VL && nc == VL) {
                for (int i = 0; i < VL; ++i) r[i] = load(s + i * ss);
            } else {
                for (int i = 0; i < VL; ++i) {
                    r[i] = splat(0.0f);
                    if (i < nr) std::memcpy(&r[i], s + i * ss, nc * sizeof(float));
                }
            }
            transpose16(r);
            for (int i = 0; i < nc; ++i) store(dst + (c0 + i) * ldd + r0, r[i]);
        }
    }
}

// A row-major operand whose rows must be whole vectors: used in place when its width is a multiple of VL,
// otherwise copied into a zero-padded buffer. Returns its row stride; *p points at the rows to use.
int64_t padded_rows(const float** p, int64_t stride, int64_t rows, int64_t cols, float* buf) {
    if (cols % VL == 0) return stride;
    int64_t w = round_up(cols);
    for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(buf + r * w, *p + r * stride, cols * sizeof(float));
        std::memset(buf + r * w + cols, 0, (w - cols) * sizeof(float));
    }
    *p = buf;
    return w;
}

struct Strides { int64_t tile, head, row; };

struct Problem {
    int64_t tiles, hq, hkv, tq, tk, d, dv;
    float scale;
    const float *q, *k, *v, *mask;  // mask: additive logits (already scaled), or null
    Strides sq, sk, sv, sm;
    float *o, *lse;                 // o: (tile, head, row) strides so; lse: contiguous (tiles, hq, tq)
    Strides so;
    // backward
    const float *out, *dout, *dlse;  // dlse: gradient of the log-sum-exp (contiguous like lse), or null
    Strides sout, sdo;
    float *dq, *dk, *dv_, *dmask;   // dq like so-strided sdq; dk, dv like sdk/sdv; dmask contiguous (tiles, hq, tq, tk)
    Strides sdq, sdk, sdv;
};

inline const float* at(const float* base, const Strides& s, int64_t t, int64_t h) {
    return base + t * s.tile + h * s.head;
}
inline float* at(float* base, const Strides& s, int64_t t, int64_t h) { return base + t * s.tile + h * s.head; }

// logits of one (tile, head): S[tq x tkp] = q k^T (kt: k^T, d x tkp). With a mask the scale and the mask are
// applied here (S = scale q k^T + mask); without one the caller folds the scale into the exponent. Padding keys -inf.
void logits(const Problem& P, int64_t t, int64_t h, const float* kt, int64_t tkp, float* S) {
    const float* q = at(P.q, P.sq, t, h);
    gemm(P.tq, tkp, P.d, q, P.sq.row, kt, tkp, S, tkp, false);
    const float* m = P.mask ? at(P.mask, P.sm, t, h) : nullptr;
    for (int64_t i = 0; i < P.tq; ++i) {
        float* s = S + i * tkp;
        if (m) {
            const float* mi = m + i * P.sm.row;
            for (int64_t j = 0; j < P.tk; ++j) s[j] = s[j] * P.scale + mi[j];
        }
        for (int64_t j = P.tk; j < tkp; ++j) s[j] = -INFINITY;
    }
}

// The scale still to apply to S: 1 when logits() applied it with the mask.
inline float pending_scale(const Problem& P) { return P.mask ? 1.0f : P.scale; }

// Prefetch the rows of a (tile, head) operand that the next work item reads.
inline void prefetch_rows(const float* p, int64_t stride, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; c += 64 / sizeof(float)) __builtin_prefetch(p + r * stride + c);
}

void forward_range(const Problem& P, int64_t begin, int64_t end) {
    const int64_t tkp = round_up(P.tk), dvp = round_up(P.dv);
    std::vector<float> kt(P.d * tkp), S(P.tq * tkp), acc(P.tq * dvp), vbuf(P.dv % VL ? P.tk * dvp : 0);
    std::vector<float> inv(P.tq);
    const int64_t group = P.hq / P.hkv;
    const float sc = pending_scale(P);
    for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w / P.hq, h = w % P.hq, hk = h / group;
        if (w + 1 < end) {  // the next item's rows stream in while this one computes
            const int64_t t1 = (w + 1) / P.hq, h1 = (w + 1) % P.hq;
            prefetch_rows(at(P.q, P.sq, t1, h1), P.sq.row, P.tq, P.d);
            prefetch_rows(at(P.k, P.sk, t1, h1 / group), P.sk.row, P.tk, P.d);
            prefetch_rows(at(P.v, P.sv, t1, h1 / group), P.sv.row, P.tk, P.dv);
        }
        transpose(at(P.k, P.sk, t, hk), P.sk.row, P.tk, P.d, kt.data(), tkp);
        logits(P, t, h, kt.data(), tkp, S.data());
        float* lse = P.lse + (t * P.hq + h) * P.tq;
        for (int64_t i = 0; i < P.tq; ++i) {  // softmax in place (unnormalised), 1 / sum kept for the output
            float* s = S.data() + i * tkp;
            vf mv = splat(-INFINITY);
            for (int64_t j = 0; j < tkp; j += VL) mv = vmax(mv, load(s + j));
            const float m = hmax(mv) * sc;
            if (m == -INFINITY) {  // the query sees no key: output 0, lse -inf
                std::memset(s, 0, tkp * sizeof(float));
                inv[i] = 0.0f;
                lse[i] = -INFINITY;
                continue;
            }
            vf sum = splat(0.0f);
            const vf mm = splat(m);
            for (int64_t j = 0; j < tkp; j += VL) {
                vf e = vexp(load(s + j) * sc - mm);
                store(s + j, e);
                sum += e;
            }
            const float l = hsum(sum);
            inv[i] = 1.0f / l;
            lse[i] = m + std::log(l);
        }
        const float* v = at(P.v, P.sv, t, hk);
        const int64_t ldv = padded_rows(&v, P.sv.row, P.tk, P.dv, vbuf.data());
        gemm(P.tq, dvp, P.tk, S.data(), tkp, v, ldv, acc.data(), dvp, false);
        float* o = at(P.o, P.so, t, h);
        for (int64_t i = 0; i < P.tq; ++i) {
            const float* a = acc.data() + i * dvp;
            float* oi = o + i * P.so.row;
            int64_t c = 0;
            for (; c + VL <= P.dv; c += VL) store(oi + c, load(a + c) * inv[i]);
            for (; c < P.dv; ++c) oi[c] = a[c] * inv[i];
        }
    }
}

// One work item = (tile, kv head): the query heads of its group add into the same dk, dv.
void backward_range(const Problem& P, int64_t begin, int64_t end) {
    const int64_t tkp = round_up(P.tk), tqp = round_up(P.tq), dp = round_up(P.d), dvp = round_up(P.dv);
    std::vector<float> kt(P.d * tkp), vt(P.dv * tkp), S(P.tq * tkp), dS(P.tq * tkp), T(tkp * tqp);
    std::vector<float> dq(P.tq * dp), dk(P.tk * dp), dv(P.tk * dvp), delta(P.tq);
    std::vector<float> kbuf(P.d % VL ? P.tk * dp : 0), qbuf(P.d % VL ? P.tq * dp : 0);
    std::vector<float> dobuf(P.dv % VL ? P.tq * dvp : 0);
    const int64_t group = P.hq / P.hkv;
    const float sc = pending_scale(P);
    for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w / P.hkv, hk = w % P.hkv;
        const float* k = at(P.k, P.sk, t, hk);
        transpose(k, P.sk.row, P.tk, P.d, kt.data(), tkp);
        transpose(at(P.v, P.sv, t, hk), P.sv.row, P.tk, P.dv, vt.data(), tkp);
        const int64_t ldk = padded_rows(&k, P.sk.row, P.tk, P.d, kbuf.data());
        std::fill(dk.begin(), dk.end(), 0.0f);
        std::fill(dv.begin(), dv.end(), 0.0f);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            logits(P, t, h, kt.data(), tkp, S.data());
            const float* lse = P.lse + (t * P.hq + h) * P.tq;
            const float* o = at(P.out, P.sout, t, h);
            const float* dout = at(P.dout, P.sdo, t, h);
            for (int64_t i = 0; i < P.tq; ++i) {  // p = exp(s - lse); delta = rowsum(dO * O)
                float* s = S.data() + i * tkp;
                if (lse[i] == -INFINITY) {
                    std::memset(s, 0, tkp * sizeof(float));
                } else {
                    const vf l = splat(lse[i]);
                    for (int64_t j = 0; j < tkp; j += VL) store(s + j, vexp(load(s + j) * sc - l));
                }
                float dd = 0.0f;
                for (int64_t c = 0; c < P.dv; ++c) dd += dout[i * P.sdo.row + c] * o[i * P.sout.row + c];
                delta[i] = P.dlse ? dd - P.dlse[(t * P.hq + h) * P.tq + i] : dd;  // d lse / d s = p
            }
            gemm(P.tq, tkp, P.dv, dout, P.sdo.row, vt.data(), tkp, dS.data(), tkp, false);  // dP = dO v^T
            for (int64_t i = 0; i < P.tq; ++i) {  // dS = P (dP - delta)
                float* ds = dS.data() + i * tkp;
                const float* p = S.data() + i * tkp;
                const vf di = splat(delta[i]);
                for (int64_t j = 0; j < tkp; j += VL) store(ds + j, load(p + j) * (load(ds + j) - di));
            }
            if (P.dmask) {
                float* dm = P.dmask + ((t * P.hq + h) * P.tq) * P.tk;
                for (int64_t i = 0; i < P.tq; ++i) std::memcpy(dm + i * P.tk, dS.data() + i * tkp, P.tk * 4);
            }
            // dq = scale dS k
            gemm(P.tq, dp, P.tk, dS.data(), tkp, k, ldk, dq.data(), dp, false);
            float* dqo = at(P.dq, P.sdq, t, h);
            for (int64_t i = 0; i < P.tq; ++i)
                for (int64_t c = 0; c < P.d; ++c) dqo[i * P.sdq.row + c] = dq[i * dp + c] * P.scale;
            // dv += P^T dO, dk += dS^T q (scaled when written)
            const float* dop = dout;
            const int64_t lddo = padded_rows(&dop, P.sdo.row, P.tq, P.dv, dobuf.data());
            transpose(S.data(), tkp, P.tq, P.tk, T.data(), tqp);
            gemm(P.tk, dvp, P.tq, T.data(), tqp, dop, lddo, dv.data(), dvp, true);
            const float* q = at(P.q, P.sq, t, h);
            const int64_t ldq = padded_rows(&q, P.sq.row, P.tq, P.d, qbuf.data());
            transpose(dS.data(), tkp, P.tq, P.tk, T.data(), tqp);
            gemm(P.tk, dp, P.tq, T.data(), tqp, q, ldq, dk.data(), dp, true);
        }
        float* dko = at(P.dk, P.sdk, t, hk);
        float* dvo = at(P.dv_, P.sdv, t, hk);
        for (int64_t j = 0; j < P.tk; ++j) {
            for (int64_t c = 0; c < P.d; ++c) dko[j * P.sdk.row + c] = dk[j * dp + c] * P.scale;
            for (int64_t c = 0; c < P.dv; ++c) dvo[j * P.sdv.row + c] = dv[j * dvp + c];
        }
    }
}

template <class F>
void parallel(int64_t items, int threads, F fn) {
    threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, items));
    if (threads == 1) { fn(0, items); return; }
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i) {
        const int64_t a = items * i / threads, b = items * (i + 1) / threads;
        pool.emplace_back([=] { fn(a, b); });
    }
    for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

// Layout of the integer arguments: sizes [tiles, hq, hkv, tq, tk, d, dv], then (tile, head, row) strides in
// elements for q, k, v, mask, o. Returns 0.
int attnlab_tile_forward(const int64_t* sizes, const int64_t* strides, float scale, const float* q, const float* k,
                         const float* v, const float* mask, float* o, float* lse, int threads) {
    Problem P{};
    P.tiles = sizes[0]; P.hq = sizes[1]; P.hkv = sizes[2]; P.tq = sizes[3]; P.tk = sizes[4]; P.d = sizes[5];
    P.dv = sizes[6];
    P.scale = scale; P.q = q; P.k = k; P.v = v; P.mask = mask; P.o = o; P.lse = lse;
    Strides* s[] = {&P.sq, &P.sk, &P.sv, &P.sm, &P.so};
    for (int i = 0; i < 5; ++i) *s[i] = Strides{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
    parallel(P.tiles * P.hq, threads, [&](int64_t a, int64_t b) { forward_range(P, a, b); });
    return 0;
}

// Strides as above for q, k, v, mask, out, dout, dq, dk, dv. dmask (optional): contiguous (tiles, hq, tq, tk).
int attnlab_tile_backward(const int64_t* sizes, const int64_t* strides, float scale, const float* q, const float* k,
                          const float* v, const float* mask, const float* out, const float* lse, const float* dout,
                          const float* dlse, float* dq, float* dk, float* dv, float* dmask, int threads) {
    Problem P{};
    P.tiles = sizes[0]; P.hq = sizes[1]; P.hkv = sizes[2]; P.tq = sizes[3]; P.tk = sizes[4]; P.d = sizes[5];
    P.dv = sizes[6];
    P.scale = scale; P.q = q; P.k = k; P.v = v; P.mask = mask; P.out = out; P.lse = const_cast<float*>(lse);
    P.dout = dout; P.dlse = dlse; P.dq = dq; P.dk = dk; P.dv_ = dv; P.dmask = dmask;
    Strides* s[] = {&P.sq, &P.sk, &P.sv, &P.sm, &P.sout, &P.sdo, &P.sdq, &P.sdk, &P.sdv};
    for (int i = 0; i < 9; ++i) *s[i] = Strides{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
    parallel(P.tiles * P.hkv, threads, [&](int64_t a, int64_t b) { backward_range(P, a, b); });
    return 0;
}

}  // extern "C"
