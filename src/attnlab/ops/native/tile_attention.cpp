// Fused softmax attention over many small tiles, on the CPU (fp32), forward and backward.
//
// Window, block, halo and neighbourhood mechanisms attend within small tiles (64 queries x 64..256 keys). PyTorch's
// SDPA runs such problems at about a third of its dense rate: its blocked kernel is built for long sequences, and
// every tile pays for BLAS calls on matrices too small to amortise them. This kernel does one tile per work item
// entirely in a per-thread workspace that stays in L1/L2: logits = q k^T (register-blocked), softmax in place, then
// p v; the backward recomputes p from the saved log-sum-exp (the flash-attention recurrences, one block per tile).
//
// Built once per machine by attnlab/ops/native/__init__.py (g++ -O3 -march=native) and called through ctypes; no
// PyTorch headers. Layout: every operand is a strided (batch, tile, head, row, column) array with unit column stride;
// rows are addressed directly or through an index (tiles read in place from token-major tensors).
// GCC vector extensions give one-register vectors (vec.h) of AVX-512, AVX2 or SSE, whatever the machine has.

#include <utility>

#include "vec.h"

namespace {

// Matrix operands by rows: a dense buffer with a row stride, or an array of row pointers (rows read in place
// from wherever the tile's tokens are); as the A of a product also by columns (a transposed operand read in place).
// step(): the distance between consecutive elements of a row.
struct Strided {
    const float* p;
    int64_t ld;
    const float* row(int64_t r) const { return p + r * ld; }
    static constexpr int64_t step() { return 1; }
};
struct Rows {
    const float* const* p;
    const float* row(int64_t r) const { return p[r]; }
    static constexpr int64_t step() { return 1; }
};
struct Transposed {  // element (i, k) at p[i + k * ld]
    const float* p;
    int64_t ld;
    const float* row(int64_t r) const { return p + r; }
    int64_t step() const { return ld; }
};

// c[MR][NV] += A[i .. i + MR, :K] B[:K, j .. j + NV VL]: A read one scalar at a time, B by rows of vectors; the
// MR x NV block stays in registers across the whole K loop.
template <int MR, int NV, class AT, class BT>
inline void product(int64_t K, const AT& A, int64_t i, const BT& B, int64_t j, vf (&c)[MR][NV]) {
    const float* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = A.row(i + r);
    const int64_t step = A.step();
    for (int64_t k = 0; k < K; ++k) {
        vf b[NV];
        const float* bk = B.row(k) + j;
        for (int v = 0; v < NV; ++v) b[v] = load(bk + v * VL);
        for (int r = 0; r < MR; ++r) {
            vf x = splat(a[r][k * step]);
            for (int v = 0; v < NV; ++v) c[r][v] += x * b[v];
        }
    }
}

// C[M x N] (+)= A[M x K] B[K x N]; N a multiple of VL (B's rows hold whole vectors), one MR x NV block of C.
template <int MR, int NV, class AT, class BT>
inline void micro(int64_t K, const AT& A, int64_t i, const BT& B, int64_t j, float* C, int64_t ldc, bool accumulate) {
    vf c[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? load(C + r * ldc + v * VL) : splat(0.0f);
    product<MR, NV>(K, A, i, B, j, c);
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) store(C + r * ldc + v * VL, c[r][v]);
}

// Rows per register block for NV <= 4 vectors of columns: MR * NV accumulators + NV + 1 vectors fit the registers
// (with 32, the rows measured best on a Zen 4; at most 8).
template <int NV>
constexpr int rows_for() { return REGS >= 32 ? (NV <= 2 ? 8 : 6) : std::min(8, (REGS - NV - 1) / NV); }
// Vectors of columns per register block of a product: 4 with 32 registers (6 x 4 accumulators), 2 with 16 (6 x 2).
constexpr int GEMM_NV = REGS >= 32 ? 4 : 2;

template <int NV, class AT, class BT>
inline void rows_block(int64_t M, int64_t K, const AT& A, const BT& B, int64_t j, float* C, int64_t ldc, bool acc) {
    constexpr int MR = rows_for<NV>();
    int64_t i = 0;
    for (; i + MR <= M; i += MR) micro<MR, NV>(K, A, i, B, j, C + i * ldc, ldc, acc);
    upto<MR - 1>(M - i, [&](auto rows) {  // the last rows
        micro<decltype(rows)::value, NV>(K, A, i, B, j, C + i * ldc, ldc, acc);
    });
}

template <class AT, class BT>
void gemm(int64_t M, int64_t N, int64_t K, const AT& A, const BT& B, float* C, int64_t ldc, bool acc) {
    int64_t j = 0;
    for (; j + GEMM_NV * VL <= N; j += GEMM_NV * VL) rows_block<GEMM_NV>(M, K, A, B, j, C + j, ldc, acc);
    upto<GEMM_NV - 1>((N - j) / VL, [&](auto nv) {  // fewer vectors left
        rows_block<decltype(nv)::value>(M, K, A, B, j, C + j, ldc, acc);
    });
}

// Dense buffers as operands.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
    gemm(M, N, K, Strided{A, lda}, Strided{B, ldb}, C, ldc, acc);
}

// VL x VL transpose in registers: level B swaps bit B of the row and the column index (rows i and i + B exchange
// their blocks of B elements); after the log2 VL levels element (r, c) is at (c, r).
template <int B, size_t... C>
inline vf level_lo(vf a, vf b, std::index_sequence<C...>) {
    return __builtin_shufflevector(a, b, ((C & B) ? VL + C - B : C)...);
}
template <int B, size_t... C>
inline vf level_hi(vf a, vf b, std::index_sequence<C...>) {
    return __builtin_shufflevector(a, b, ((C & B) ? VL + C : C + B)...);
}
template <int B = VL / 2>
inline void transpose_block(vf* r) {
    for (int i = 0; i < VL; ++i)
        if (!(i & B)) {
            const vf a = r[i], b = r[i + B];
            r[i] = level_lo<B>(a, b, std::make_index_sequence<VL>{});
            r[i + B] = level_hi<B>(a, b, std::make_index_sequence<VL>{});
        }
    if constexpr (B > 1) transpose_block<B / 2>(r);
}

// dst[cols x ldd] = src^T for src given by its row pointers (rows x cols), ldd = round_up(rows): columns
// rows..ldd are zero (padding keys contribute nothing). Whole VL x VL blocks in registers; edges through zero padding.
void transpose(const float* const* src, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
    vf r[VL];
    for (int64_t r0 = 0; r0 < rows; r0 += VL) {
        const int64_t nr = std::min<int64_t>(VL, rows - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += VL) {
            const int64_t nc = std::min<int64_t>(VL, cols - c0);
            if (nr == VL && nc == VL) {
                for (int i = 0; i < VL; ++i) r[i] = load(src[r0 + i] + c0);
            } else {
                for (int i = 0; i < VL; ++i) {
                    r[i] = splat(0.0f);
                    if (i < nr) std::memcpy(&r[i], src[r0 + i] + c0, nc * sizeof(float));
                }
            }
            transpose_block(r);
            for (int i = 0; i < nc; ++i) store(dst + (c0 + i) * ldd + r0, r[i]);
        }
    }
}

// Copy rows (given by pointers) into a dense buffer whose rows are whole vectors (zero-padded to ld).
void copy_rows(const float* const* src, int64_t rows, int64_t cols, float* dst, int64_t ld) {
    for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(dst + r * ld, src[r], cols * sizeof(float));
        std::memset(dst + r * ld + cols, 0, (ld - cols) * sizeof(float));
    }
}

// A strided array addressed by (batch b, tile t, head h, row i): base + b sb + t st + h sh + r sr, where the row r
// is i itself, or idx[t * len + i] when an index is given (rows gathered from / scattered to token positions).
template <class T>
struct Op {
    T* p = nullptr;
    int64_t sb = 0, st = 0, sh = 0, sr = 0;
    const int64_t* idx = nullptr;
    T* row(int64_t b, int64_t t, int64_t h, int64_t i, int64_t len) const {
        return p + b * sb + t * st + h * sh + (idx ? idx[t * len + i] : i) * sr;
    }
};

struct Problem {
    int64_t B, T, hq, hkv, tq, tk, d, dv;
    float scale;
    Op<const float> q, k, v, mask;  // mask: additive logits (already scaled), or null; rows never indexed
    const int32_t* mask_sel;        // (B * T): the mask slot (along mask.sb) of each (b, t), -1 for none; or null
    Op<float> o, lse;               // lse: a 1-column operand (one float per query row)
    const uint8_t* q_valid;         // (T, tq): slots whose output is written, or null (all)
    const uint8_t* kpm;             // (B, key positions): 0 = padding key, or null; kpm_sb its batch stride
    const int32_t* krange;          // (T, tq, 2): first and one-past-last key slot each query sees (the rest
                                    // hidden; the mask may hide more), or null (all)
    int64_t kpm_sb;
    bool stream;                    // forward: output rows written by non-temporal stores (see STREAM_BYTES)
    // backward
    Op<const float> out, dout, dlse;  // dlse may be null
    Op<float> dq, dk, dvv;            // dk, dvv (d v) are accumulated (+=): callers zero them
    float* dmask;                     // contiguous (B, T, hq, tq, tk), or null
};

// Per-thread scratch, sized once per call.
struct Work {
    std::vector<float> kt, vt, S, dS, Tb, qb, kb, vb, dob, acc, dqa, dka, dva, inv, delta, mx, cb;
    std::vector<const float*> qr, kr, vr, dor;
    Work(const Problem& P, bool backward) {
        const int64_t tkp = round_up(P.tk), tqp = round_up(P.tq), dp = round_up(P.d), dvp = round_up(P.dv);
        kt.resize(P.d * tkp); S.resize(P.tq * tkp); qr.resize(P.tq); kr.resize(P.tk); vr.resize(P.tk);
        inv.resize(round_up(P.tq)); mx.resize(round_up(P.tq));  // whole vectors for finish()
        if (P.dv % VL) vb.resize(P.tk * dvp);  // value rows padded to whole vectors
        if (backward) {
            qb.resize(P.tq * dp); vt.resize(P.dv * tkp); dS.resize(P.tq * tkp); Tb.resize(tkp * tqp);
            kb.resize(P.tk * dp);
            dob.resize(P.tq * dvp); dqa.resize(P.tq * dp); dka.resize(P.tk * dp); dva.resize(P.tk * dvp);
            delta.resize(P.tq); dor.resize(P.tq);
        } else {
            acc.resize(P.tq * dvp); cb.resize(tkp);
        }
    }
};

// The scale still to apply to S: 1 when logits() applied it with the mask.
inline float pending_scale(const Problem& P) { return P.mask.p ? 1.0f : P.scale; }

// Item (b, t, h)'s mask (its row i at + i * mask.sr), or null when it has none.
inline const float* mask_of(const Problem& P, int64_t b, int64_t t, int64_t h) {
    if (!P.mask.p) return nullptr;
    if (!P.mask_sel) return P.mask.p + b * P.mask.sb + t * P.mask.st + h * P.mask.sh;
    const int32_t slot = P.mask_sel[b * P.T + t];
    return slot < 0 ? nullptr : P.mask.p + slot * P.mask.sb + h * P.mask.sh;
}

// Tile t's key ranges (query i sees key slots [r[2 i], r[2 i + 1])), or null when every query may see every key.
inline const int32_t* key_range(const Problem& P, int64_t t) { return P.krange ? P.krange + 2 * t * P.tq : nullptr; }

// Row pointers of (b, t, h) for an operand.
template <class T>
void rows_of(const Op<T>& op, int64_t b, int64_t t, int64_t h, int64_t n, const float** out) {
    for (int64_t i = 0; i < n; ++i) out[i] = op.row(b, t, h, i, n);
}

// Row helpers over n floats: whole vectors, then the tail.
inline float dot(const float* a, const float* b, int64_t n) {
    vf acc = splat(0.0f);
    int64_t c = 0;
    for (; c + VL <= n; c += VL) acc += load(a + c) * load(b + c);
    float r = hsum(acc);
    for (; c < n; ++c) r += a[c] * b[c];
    return r;
}
inline void scaled_to(float* dst, const float* src, float s, int64_t n) {  // dst = s * src
    int64_t c = 0;
    for (; c + VL <= n; c += VL) store(dst + c, load(src + c) * s);
    for (; c < n; ++c) dst[c] = src[c] * s;
}
inline void scaled_add(float* dst, const float* src, float s, int64_t n) {  // dst += s * src
    int64_t c = 0;
    for (; c + VL <= n; c += VL) store(dst + c, load(dst + c) + load(src + c) * s);
    for (; c < n; ++c) dst[c] += src[c] * s;
}

// Outputs of at least this many bytes are written by non-temporal stores: they do not fit the caches anyway, and
// streaming them saves the read for ownership of every line (17.5 us per 64 x 64 item instead of 18.8 on a 32 MB
// output). A smaller output stays in cache for the operation that reads it next.
constexpr int64_t STREAM_BYTES = 8 << 20;

// dst = s * src by non-temporal stores (whole lines straight to memory, no read for ownership) where dst is a run of
// whole aligned vectors and the machine has them (stream_store, vec.h); stream_fence() orders them before the
// kernel returns.
inline bool stream_ok(const float* dst, int64_t n) { return n % VL == 0 && stream_aligned(dst); }
inline void stream_scaled(float* dst, const float* src, float s, int64_t n) {
    for (int64_t c = 0; c < n; c += VL) stream_store(dst + c, load(src + c) * s);
}

inline void prefetch(const float* const* rows, int64_t n, int64_t cols) {
    for (int64_t r = 0; r < n; ++r) prefetch_span<0, 2>(rows[r], cols);  // into L2: L1 holds the current item
}

inline bool valid(const Problem& P, int64_t t, int64_t i) { return !P.q_valid || P.q_valid[t * P.tq + i]; }

// Row blocks of a tile and the key columns they need: [i0, i1) x [j0, j1), j0 and j1 multiples of VL. With
// krange (a neighbourhood's or a band's tiles, where each query sees only part of its tile's region), blocks of
// a few rows skip the key columns none of their rows sees; otherwise one block of every row and column.
struct Block { int64_t i0, i1, j0, j1; };

void row_blocks(const Problem& P, int64_t t, std::vector<Block>& out) {
    const int64_t tkp = round_up(P.tk);
    out.clear();
    if (!P.krange) { out.push_back({0, P.tq, 0, tkp}); return; }
    // 4: one image row of a 4 x 4 neighbourhood tile; with 16 registers 6, one whole register block of rows (8 left
    // a block of 2 rows per 8, twice the loads per FMA: the band core of sliding-window, window 512, took ~15% longer)
    const int64_t rb = P.tq <= 32 ? 4 : REGS >= 32 ? 8 : rows_for<GEMM_NV>();
    for (int64_t i0 = 0; i0 < P.tq; i0 += rb) {
        const int64_t i1 = std::min(P.tq, i0 + rb);
        int64_t j0 = tkp, j1 = 0;
        for (int64_t i = i0; i < i1; ++i) {
            const int32_t* r = P.krange + 2 * (t * P.tq + i);
            if (r[0] < r[1]) { j0 = std::min<int64_t>(j0, r[0]); j1 = std::max<int64_t>(j1, r[1]); }
        }
        const Block k = j0 >= j1 ? Block{i0, i1, 0, 0}  // no row of the block sees a key
                                 : Block{i0, i1, j0 / VL * VL, std::min(tkp, round_up(j1))};
        if (!out.empty() && out.back().j0 == k.j0 && out.back().j1 == k.j1) out.back().i1 = i1;  // same columns
        else out.push_back(k);
    }
}

// logits of rows [i0, i1) x key columns [j0, j1) of one (b, t, h): S = q k^T from the q rows (the block's first row
// first) and kt = k^T (d x tkp). With a mask operand the scale and the item's mask (if it has one) are applied here
// (S = scale q k^T + mask); without one the caller folds the scale into the exponent. Padding keys (of the kpm, and
// past tk) and the keys outside a query's key range are -inf.
template <class AT>
void logits(const Problem& P, int64_t b, int64_t t, int64_t h, const AT& q, const Block& k, Work& w) {
    const int64_t tkp = round_up(P.tk), kend = std::min(k.j1, P.tk);
    const float* mask = mask_of(P, b, t, h);
    const int32_t* kr = key_range(P, t);
    float* S = w.S.data();
    gemm(k.i1 - k.i0, k.j1 - k.j0, P.d, q, Strided{w.kt.data() + k.j0, tkp}, S + k.i0 * tkp + k.j0, tkp, false);
    for (int64_t i = k.i0; i < k.i1; ++i) {
        float* s = S + i * tkp;
        if (mask) {
            const float* mi = mask + i * P.mask.sr;
            for (int64_t j = k.j0; j < kend; ++j) s[j] = s[j] * P.scale + mi[j];
        } else if (P.mask.p) {
            for (int64_t j = k.j0; j < kend; ++j) s[j] *= P.scale;
        }
        for (int64_t j = std::max(kend, k.j0); j < k.j1; ++j) s[j] = -INFINITY;
        if (kr) {
            for (int64_t j = k.j0; j < std::min<int64_t>(kr[2 * i], k.j1); ++j) s[j] = -INFINITY;
            for (int64_t j = std::max<int64_t>(kr[2 * i + 1], k.j0); j < k.j1; ++j) s[j] = -INFINITY;
        }
    }
    if (P.kpm) {
        const uint8_t* kp = P.kpm + b * P.kpm_sb;
        for (int64_t j = k.j0; j < kend; ++j) {
            if (kp[P.k.idx ? P.k.idx[t * P.tk + j] : j]) continue;
            for (int64_t i = k.i0; i < k.i1; ++i) S[i * tkp + j] = -INFINITY;
        }
    }
}

// Rows i .. i + MR of a tile whose block of key columns [j0, j0 + NV VL) fits one register block of NV vectors: the
// logits and the unnormalised softmax without leaving registers. kt, mask (row r at + r * ldm), cb and S start at
// column j0. s = scale q k^T + mask + cb (cb: 0, or -inf for padding keys), -inf outside the row's key range kr;
// S = exp(s - m) is stored, the row max m to mx and the row sum to l (finish() turns them into lse and 1 / l).
template <int MR, int NV, class AT>
inline void softmax_rows(int64_t K, const AT& A, int64_t i, const float* kt, int64_t ldk, const float* mask,
                         int64_t ldm, const float* cb, const int32_t* kr, int64_t j0, float scale, float* S,
                         int64_t lds, float* mx, float* l) {
    vf c[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) c[r][v] = splat(0.0f);
    product<MR, NV>(K, A, i, Strided{kt, ldk}, 0, c);
    for (int r = 0; r < MR; ++r) {
        vf top = splat(-INFINITY);
        const int64_t first = kr ? kr[2 * (i + r)] - j0 : 0, last = kr ? kr[2 * (i + r) + 1] - j0 : NV * VL;
        for (int v = 0; v < NV; ++v) {
            c[r][v] = c[r][v] * scale + load(cb + v * VL);
            if (mask) c[r][v] += load(mask + (i + r) * ldm + v * VL);
            if (first > 0 || last < NV * VL) {  // part of the block is outside this row's range
                const vf col = __builtin_convertvector(lanes(), vf) + float(v * VL);
                c[r][v] = (col < float(first)) | (col >= float(last)) ? splat(-INFINITY) : c[r][v];
            }
            top = vmax(top, c[r][v]);
        }
        float* s = S + (i + r) * lds;
        const float m = hmax(top);
        vf sum = splat(0.0f);
        if (m != -INFINITY) {  // else the query sees no key: p = 0, lse = -inf
            const float m2 = m * LOG2E;
            for (int v = 0; v < NV; ++v) {
                c[r][v] = vexp2(c[r][v] * LOG2E - m2);  // exp(c - m); masked logits (-inf) give 0
                sum += c[r][v];
            }
        }
        for (int v = 0; v < NV; ++v) store(s + v * VL, m != -INFINITY ? c[r][v] : splat(0.0f));
        mx[i + r] = m;
        l[i + r] = hsum(sum);
    }
}

// softmax_rows over rows [i0, i1).
template <int NV, class AT>
void softmax_block(int64_t i0, int64_t i1, int64_t K, const AT& A, const float* kt, int64_t ldk, const float* mask,
                   int64_t ldm, const float* cb, const int32_t* kr, int64_t j0, float scale, float* S, int64_t lds,
                   float* mx, float* l) {
    constexpr int MR = rows_for<NV>();
    int64_t i = i0;
    for (; i + MR <= i1; i += MR) softmax_rows<MR, NV>(K, A, i, kt, ldk, mask, ldm, cb, kr, j0, scale, S, lds, mx, l);
    upto<MR - 1>(i1 - i, [&](auto rows) {
        softmax_rows<decltype(rows)::value, NV>(K, A, i, kt, ldk, mask, ldm, cb, kr, j0, scale, S, lds, mx, l);
    });
}

// Column blocks of at most this many vectors take softmax_rows: 64 keys with AVX-512 (6 rows of 4 vectors), 32 with
// AVX2 (2 rows of 4; not measured against the two passes). With AVX-512 at 84-96 keys (4 rows of 6 vectors) the
// fused kernel measured 3-5% slower than the two passes.
constexpr int64_t FUSED_NV = 4;

// Per row of an item: lse = m + log l and inv = 1 / l from the row maxima and sums (l = 0: the query saw no key,
// lse = -inf and inv = 0); lse written for the valid rows.
void finish(const Problem& P, int64_t b, int64_t t, int64_t h, Work& w) {
    for (int64_t i0 = 0; i0 < P.tq; i0 += VL) {
        const vf l = load(w.inv.data() + i0), m = load(w.mx.data() + i0);
        const vi seen = l > 0.0f;
        const vf safe = seen ? l : splat(1.0f);  // no log or division of 0 in the lanes that are thrown away
        const vf lse = seen ? m + vlog(safe) : splat(-INFINITY);
        store(w.inv.data() + i0, seen ? 1.0f / safe : splat(0.0f));
        for (int64_t i = i0; i < std::min(P.tq, i0 + VL); ++i)
            if (valid(P, t, i)) *P.lse.row(b, t, h, i, P.tq) = lse[i - i0];
    }
}

// cb[j] for the key slots of tile (b, t): 0 for a key, -inf for padding (of the kpm, and past tk up to a vector).
void column_bias(const Problem& P, int64_t b, int64_t t, float* cb) {
    const uint8_t* kp = P.kpm ? P.kpm + b * P.kpm_sb : nullptr;
    for (int64_t j = 0; j < round_up(P.tk); ++j)
        cb[j] = j < P.tk && (!kp || kp[P.k.idx ? P.k.idx[t * P.tk + j] : j]) ? 0.0f : -INFINITY;
}

// Work item w = ((b * T) + t) * hq + h: one query head of one tile. Output rows are distinct across items.
void forward_range(const Problem& P, int64_t begin, int64_t end) {
    Work w(P, false);
    const int64_t tkp = round_up(P.tk), dvp = round_up(P.dv);
    const int64_t group = P.hq / P.hkv;
    const float sc = pending_scale(P), sc2 = sc * LOG2E;  // sc2: for vexp2, exponents in log2 units
    std::vector<const float*> next(std::max(P.tq, P.tk));
    std::vector<Block> blocks;
    // key columns in one register block, and a mask whose rows can be read by whole vectors
    const bool fused = tkp <= FUSED_NV * VL && (!P.mask.p || P.tk % VL == 0);
    for (int64_t it = begin; it < end; ++it) {
        const int64_t h = it % P.hq, t = it / P.hq % P.T, b = it / P.hq / P.T, hk = h / group;
        rows_of(P.q, b, t, h, P.tq, w.qr.data());
        rows_of(P.k, b, t, hk, P.tk, w.kr.data());
        rows_of(P.v, b, t, hk, P.tk, w.vr.data());
        if (it + 1 < end) {  // the next item's rows stream in while this one computes
            const int64_t h1 = (it + 1) % P.hq, t1 = (it + 1) / P.hq % P.T, b1 = (it + 1) / P.hq / P.T;
            rows_of(P.q, b1, t1, h1, P.tq, next.data());
            prefetch(next.data(), P.tq, P.d);
            rows_of(P.k, b1, t1, h1 / group, P.tk, next.data());
            prefetch(next.data(), P.tk, P.d);
            rows_of(P.v, b1, t1, h1 / group, P.tk, next.data());
            prefetch(next.data(), P.tk, P.dv);
        }
        transpose(w.kr.data(), P.tk, P.d, w.kt.data(), tkp);
        if (P.dv % VL) copy_rows(w.vr.data(), P.tk, P.dv, w.vb.data(), dvp);  // value rows padded to whole vectors
        row_blocks(P, t, blocks);
        if (fused && (it == begin || h == 0)) column_bias(P, b, t, w.cb.data());  // per tile: its heads share it
        const float* mask = fused ? mask_of(P, b, t, h) : nullptr;
        const int32_t* kr = key_range(P, t);
        for (const Block& k : blocks) {
            const int64_t rows = k.i1 - k.i0, kend = std::min(k.j1, P.tk);  // value rows stop at tk
            if (k.j0 >= k.j1) {  // nothing visible: output 0, lse -inf
                std::fill(w.inv.begin() + k.i0, w.inv.begin() + k.i1, 0.0f);
                std::memset(w.acc.data() + k.i0 * dvp, 0, rows * dvp * sizeof(float));
                continue;
            }
            if (fused) {  // logits and softmax of the block's rows in registers
                const float* mk = mask ? mask + k.j0 : nullptr;
                upto<FUSED_NV>((k.j1 - k.j0) / VL, [&](auto nv) {
                    constexpr int NV = decltype(nv)::value;
                    const float* kt = w.kt.data() + k.j0;
                    float *S = w.S.data() + k.j0, *cb = w.cb.data() + k.j0;
                    if (P.q.idx)
                        softmax_block<NV>(k.i0, k.i1, P.d, Rows{w.qr.data()}, kt, tkp, mk, P.mask.sr, cb, kr, k.j0,
                                          P.scale, S, tkp, w.mx.data(), w.inv.data());
                    else
                        softmax_block<NV>(k.i0, k.i1, P.d, Strided{w.qr[0], P.q.sr}, kt, tkp, mk, P.mask.sr, cb, kr,
                                          k.j0, P.scale, S, tkp, w.mx.data(), w.inv.data());
                });
            } else {
                if (P.q.idx)  // rows by pointer; evenly strided rows index faster (no pointer load per row)
                    logits(P, b, t, h, Rows{w.qr.data() + k.i0}, k, w);
                else
                    logits(P, b, t, h, Strided{w.qr[0] + k.i0 * P.q.sr, P.q.sr}, k, w);
                for (int64_t i = k.i0; i < k.i1; ++i) {  // softmax in place (unnormalised); row max and sum kept
                    float* s = w.S.data() + i * tkp;
                    vf mv = splat(-INFINITY);
                    for (int64_t j = k.j0; j < k.j1; j += VL) mv = vmax(mv, load(s + j));
                    const float m = hmax(mv) * sc;
                    vf sum = splat(0.0f);
                    const vf mm = splat(m * LOG2E);
                    for (int64_t j = k.j0; j < k.j1; j += VL) {  // m = -inf: the query sees no key, p = 0
                        const vf e = m == -INFINITY ? splat(0.0f) : vexp2(load(s + j) * sc2 - mm);
                        store(s + j, e);
                        sum += e;
                    }
                    w.mx[i] = m;
                    w.inv[i] = hsum(sum);
                }
            }
            const Strided p{w.S.data() + k.i0 * tkp + k.j0, tkp};
            float* acc = w.acc.data() + k.i0 * dvp;
            if (P.dv % VL) {
                gemm(rows, dvp, kend - k.j0, p, Strided{w.vb.data() + k.j0 * dvp, dvp}, acc, dvp, false);
            } else if (P.v.idx) {  // value rows read in place
                gemm(rows, dvp, kend - k.j0, p, Rows{w.vr.data() + k.j0}, acc, dvp, false);
            } else {
                gemm(rows, dvp, kend - k.j0, p, Strided{w.vr[0] + k.j0 * P.v.sr, P.v.sr}, acc, dvp, false);
            }
        }
        finish(P, b, t, h, w);  // lse, and inv = 1 / l
        for (int64_t i = 0; i < P.tq; ++i) {
            if (!valid(P, t, i)) continue;
            float* o = P.o.row(b, t, h, i, P.tq);
            if (P.stream && stream_ok(o, P.dv)) stream_scaled(o, w.acc.data() + i * dvp, w.inv[i], P.dv);
            else scaled_to(o, w.acc.data() + i * dvp, w.inv[i], P.dv);
        }
    }
    stream_fence();
}

// Work item w = b * hkv + hk, over all tiles: the query heads of the group and every tile that shares a key add
// into the same dk, dv rows, so one thread owns each (batch, kv head) and the += are race-free.
void backward_range(const Problem& P, int64_t begin, int64_t end) {
    Work w(P, true);
    std::vector<Block> blocks;
    const int64_t tkp = round_up(P.tk), tqp = round_up(P.tq), dp = round_up(P.d), dvp = round_up(P.dv);
    const int64_t group = P.hq / P.hkv;
    const float sc2 = pending_scale(P) * LOG2E;  // for vexp2: exponents in log2 units
    for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / P.hkv, hk = it % P.hkv;
        for (int64_t t = 0; t < P.T; ++t) {
            rows_of(P.k, b, t, hk, P.tk, w.kr.data());
            rows_of(P.v, b, t, hk, P.tk, w.vr.data());
            transpose(w.kr.data(), P.tk, P.d, w.kt.data(), tkp);
            transpose(w.vr.data(), P.tk, P.dv, w.vt.data(), tkp);
            copy_rows(w.kr.data(), P.tk, P.d, w.kb.data(), dp);
            std::fill(w.dka.begin(), w.dka.end(), 0.0f);
            std::fill(w.dva.begin(), w.dva.end(), 0.0f);
            row_blocks(P, t, blocks);
            for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
                rows_of(P.q, b, t, h, P.tq, w.qr.data());
                copy_rows(w.qr.data(), P.tq, P.d, w.qb.data(), dp);
                rows_of(P.dout, b, t, h, P.tq, w.dor.data());
                copy_rows(w.dor.data(), P.tq, P.dv, w.dob.data(), dvp);
                for (const Block& k : blocks) {  // p, dS and dq over the key columns each block of rows sees
                    const int64_t rows = k.i1 - k.i0, kend = std::min(k.j1, P.tk);
                    for (int64_t i = k.i0; i < k.i1; ++i) {  // zero outside the block's columns
                        for (float* m : {w.S.data() + i * tkp, w.dS.data() + i * tkp}) {
                            std::memset(m, 0, k.j0 * sizeof(float));
                            std::memset(m + k.j1, 0, (tkp - k.j1) * sizeof(float));
                        }
                    }
                    if (k.j0 >= k.j1) {  // no row of the block sees a key: no gradient through it
                        std::memset(w.dqa.data() + k.i0 * dp, 0, rows * dp * sizeof(float));
                        continue;
                    }
                    logits(P, b, t, h, Strided{w.qb.data() + k.i0 * dp, dp}, k, w);
                    for (int64_t i = k.i0; i < k.i1; ++i) {  // p = exp(s - lse); delta = rowsum(dO * O) - dlse
                        float* s = w.S.data() + i * tkp;
                        const float lse = *P.lse.row(b, t, h, i, P.tq);
                        if (lse == -INFINITY || !valid(P, t, i)) {  // padding slots (copies of a real query): none
                            for (int64_t j = k.j0; j < k.j1; j += VL) store(s + j, splat(0.0f));
                        } else {
                            const vf l = splat(lse * LOG2E);
                            for (int64_t j = k.j0; j < k.j1; j += VL) store(s + j, vexp2(load(s + j) * sc2 - l));
                        }
                        const float dd = dot(w.dor[i], P.out.row(b, t, h, i, P.tq), P.dv);
                        w.delta[i] = P.dlse.p ? dd - *P.dlse.row(b, t, h, i, P.tq) : dd;  // d lse / d s = p
                    }
                    float* dsb = w.dS.data() + k.i0 * tkp + k.j0;  // dP = dO v^T, then dS = P (dP - delta)
                    gemm(rows, k.j1 - k.j0, P.dv, Strided{w.dob.data() + k.i0 * dvp, dvp},
                         Strided{w.vt.data() + k.j0, tkp}, dsb, tkp, false);
                    for (int64_t i = k.i0; i < k.i1; ++i) {
                        float* ds = w.dS.data() + i * tkp;
                        const float* p = w.S.data() + i * tkp;
                        const vf di = splat(w.delta[i]);
                        for (int64_t j = k.j0; j < k.j1; j += VL) store(ds + j, load(p + j) * (load(ds + j) - di));
                    }
                    gemm(rows, dp, kend - k.j0, Strided{dsb, tkp}, Strided{w.kb.data() + k.j0 * dp, dp},
                         w.dqa.data() + k.i0 * dp, dp, false);  // dq = scale dS k
                }
                if (P.dmask) {
                    float* dm = P.dmask + (((b * P.T + t) * P.hq + h) * P.tq) * P.tk;
                    for (int64_t i = 0; i < P.tq; ++i) std::memcpy(dm + i * P.tk, w.dS.data() + i * tkp, P.tk * 4);
                }
                for (int64_t i = 0; i < P.tq; ++i) {
                    if (!valid(P, t, i)) continue;
                    float* dq = P.dq.row(b, t, h, i, P.tq);
                    scaled_to(dq, w.dqa.data() + i * dp, P.scale, P.d);
                }
                {  // dv += P^T dO, dk += dS^T q (scaled when written)
                    std::vector<const float*>& rp = w.qr;  // reuse as row pointers into S / dS
                    for (int64_t i = 0; i < P.tq; ++i) rp[i] = w.S.data() + i * tkp;
                    transpose(rp.data(), P.tq, P.tk, w.Tb.data(), tqp);
                    gemm(P.tk, dvp, P.tq, w.Tb.data(), tqp, w.dob.data(), dvp, w.dva.data(), dvp, true);
                    for (int64_t i = 0; i < P.tq; ++i) rp[i] = w.dS.data() + i * tkp;
                    transpose(rp.data(), P.tq, P.tk, w.Tb.data(), tqp);
                    gemm(P.tk, dp, P.tq, w.Tb.data(), tqp, w.qb.data(), dp, w.dka.data(), dp, true);
                }
            }
            for (int64_t j = 0; j < P.tk; ++j) {  // into the (possibly shared) key rows
                float* dk = P.dk.row(b, t, hk, j, P.tk);
                float* dv = P.dvv.row(b, t, hk, j, P.tk);
                scaled_add(dk, w.dka.data() + j * dp, P.scale, P.d);
                scaled_add(dv, w.dva.data() + j * dvp, 1.0f, P.dv);
            }
        }
    }
}

// Operand descriptors from the integer array: per operand [sb, st, sh, sr] and its pointer from ptrs.
template <class T>
Op<T> op(void* const* ptrs, const int64_t* st, int i, const int64_t* idx) {
    Op<T> o;
    o.p = static_cast<T*>(ptrs[i]);
    o.sb = st[4 * i]; o.st = st[4 * i + 1]; o.sh = st[4 * i + 2]; o.sr = st[4 * i + 3];
    o.idx = idx;
    return o;
}

// What both directions share: q, k, v, mask (slots 0-3) and lse (slot 5), the indices, masks and key ranges.
Problem problem(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale, const int64_t* q_index,
                const int64_t* k_index, const uint8_t* q_valid, const uint8_t* kpm, const int32_t* k_range,
                const int32_t* mask_sel) {
    Problem P{};
    P.B = sizes[0]; P.T = sizes[1]; P.hq = sizes[2]; P.hkv = sizes[3]; P.tq = sizes[4]; P.tk = sizes[5];
    P.d = sizes[6]; P.dv = sizes[7]; P.kpm_sb = sizes[8];
    P.scale = scale;
    P.q = op<const float>(ptrs, strides, 0, q_index);
    P.k = op<const float>(ptrs, strides, 1, k_index);
    P.v = op<const float>(ptrs, strides, 2, k_index);
    P.mask = op<const float>(ptrs, strides, 3, nullptr);
    P.lse = op<float>(ptrs, strides, 5, q_index);
    P.q_valid = q_valid; P.kpm = kpm; P.krange = k_range; P.mask_sel = mask_sel;
    return P;
}

}  // namespace

extern "C" {

// Floats per vector of this build (16 with AVX-512, 8 with AVX2, 4 otherwise): the neighbourhood kernel's geometry
// limits depend on it.
int attnlab_vector_width() { return VL; }

// sizes: [B, T, hq, hkv, tq, tk, d, dv, kpm batch stride]. ptrs and strides (4 per operand: batch, tile, head, row),
// in this order: q, k, v, mask, o, lse. q_index (T, tq) and k_index (T, tk) may be null (rows are then the tile's
// own rows i); q_index also addresses o and lse. q_valid (T, tq), kpm, k_range (T, tq, 2: the key slots [first, last)
// each query may see; the mask may hide more) and mask_sel (B * T: the slot along the mask's batch stride that holds
// (b, t)'s mask, -1 for no mask; its tile stride is then ignored) may be null.
int attnlab_tile_forward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                         const int64_t* q_index, const int64_t* k_index, const uint8_t* q_valid, const uint8_t* kpm,
                         const int32_t* k_range, const int32_t* mask_sel, int threads) {
    Problem P = problem(sizes, strides, ptrs, scale, q_index, k_index, q_valid, kpm, k_range, mask_sel);
    P.o = op<float>(ptrs, strides, 4, q_index);
    P.stream = P.B * P.T * P.hq * P.tq * P.dv * int64_t(sizeof(float)) >= STREAM_BYTES;
    parallel(P.B * P.T * P.hq, threads, [&](int64_t a, int64_t b) { forward_range(P, a, b); });
    return 0;
}

// As the forward, with operands q, k, v, mask, out, lse, dout, dlse, dq, dk, dv (dk, dv zeroed by the caller when
// keys are shared between tiles) and dmask (optional, contiguous (B, T, hq, tq, tk); its strides are ignored).
int attnlab_tile_backward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                          const int64_t* q_index, const int64_t* k_index, const uint8_t* q_valid, const uint8_t* kpm,
                          const int32_t* k_range, const int32_t* mask_sel, int threads) {
    Problem P = problem(sizes, strides, ptrs, scale, q_index, k_index, q_valid, kpm, k_range, mask_sel);
    P.out = op<const float>(ptrs, strides, 4, q_index);
    P.dout = op<const float>(ptrs, strides, 6, q_index);
    P.dlse = op<const float>(ptrs, strides, 7, q_index);
    P.dq = op<float>(ptrs, strides, 8, q_index);
    P.dk = op<float>(ptrs, strides, 9, k_index);
    P.dvv = op<float>(ptrs, strides, 10, k_index);
    P.dmask = static_cast<float*>(ptrs[11]);
    parallel(P.B * P.hkv, threads, [&](int64_t a, int64_t b) { backward_range(P, a, b); });
    return 0;
}


// Batched matrix products with strided operands, C[b, g] (+)= A[b, g] B[b, g] (fp32): A (M x K) read in place by rows
// (column stride 1) or by columns (row stride 1: a transposed operand), B (K x N) and C (M x N) by rows with unit
// column stride, N a multiple of 16. sizes: [batch, groups, M, N, K]; strides: [batch, group, row, column] of A, then
// [batch, group, row] of B and of C; ptrs: A, B, C.
//
// For the products of channel attention (DaViT) on token-major operands, whose shapes BLAS's batched path runs at a
// third of its rate: 64 x 64 outputs reducing over all pixels, and all pixels times a 64 x 64 matrix. A work item is
// (batch, block of 256 rows of C, part of K); it walks its K in panels of 128 and, within a panel, every group, so
// the token rows that hold all groups are read whole while they are in cache. When there are fewer row blocks than
// threads, K is split into parts that sum into per-part buffers, added into C at the end.
int attnlab_gemm(const int64_t* sizes, const int64_t* strides, void* const* ptrs, int accumulate, int threads) {
    const int64_t nb = sizes[0], ng = sizes[1], M = sizes[2], N = sizes[3], K = sizes[4];
    const int64_t *sa = strides, *sb = strides + 4, *sc = strides + 7;
    const float *a = static_cast<const float*>(ptrs[0]), *bp = static_cast<const float*>(ptrs[1]);
    float* c = static_cast<float*>(ptrs[2]);
    constexpr int64_t RB = 256, KB = 128;
    const int64_t blocks = (M + RB - 1) / RB, panels = (K + KB - 1) / KB;
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(panels, threads / std::max<int64_t>(1, nb * blocks)));
    std::vector<float> partial(parts > 1 ? (parts - 1) * nb * ng * M * N : 0);  // parts 1.. (part 0 writes C)
    auto rows_of_part = [&](int64_t part, int64_t b, int64_t g, int64_t i0) {  // where a part's C rows go, and ldc
        if (part == 0) return std::make_pair(c + b * sc[0] + g * sc[1] + i0 * sc[2], sc[2]);
        return std::make_pair(partial.data() + (((part - 1) * nb + b) * ng + g) * M * N + i0 * N, N);
    };
    parallel(nb * blocks * parts, threads, [&](int64_t begin, int64_t end) {
        for (int64_t it = begin; it < end; ++it) {
            const int64_t b = it / (blocks * parts), i0 = it / parts % blocks * RB, part = it % parts;
            const int64_t rows = std::min(RB, M - i0);
            const int64_t p0 = panels * part / parts, p1 = panels * (part + 1) / parts;
            if (p0 == p1 && (part || !accumulate))  // nothing to add up: C = 0 (or unchanged)
                for (int64_t g = 0; g < ng; ++g) {
                    const auto [C, ldc] = rows_of_part(part, b, g, i0);
                    for (int64_t i = 0; i < rows; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
                }
            for (int64_t pn = p0; pn < p1; ++pn) {
                const int64_t k0 = pn * KB, kc = std::min(KB, K - k0);
                const bool acc = pn > p0 || (accumulate && part == 0);
                for (int64_t g = 0; g < ng; ++g) {
                    const float* A = a + b * sa[0] + g * sa[1] + i0 * sa[2];
                    const Strided Bk{bp + b * sb[0] + g * sb[1] + k0 * sb[2], sb[2]};
                    const auto [C, ldc] = rows_of_part(part, b, g, i0);
                    if (sa[3] == 1)
                        gemm(rows, N, kc, Strided{A + k0, sa[2]}, Bk, C, ldc, acc);
                    else
                        gemm(rows, N, kc, Transposed{A + k0 * sa[3], sa[3]}, Bk, C, ldc, acc);
                }
            }
        }
    });
    for (int64_t part = 1; part < parts; ++part)  // the K parts into C
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t g = 0; g < ng; ++g) {
                const float* add = rows_of_part(part, b, g, 0).first;
                for (int64_t i = 0; i < M; ++i) scaled_add(c + b * sc[0] + g * sc[1] + i * sc[2], add + i * N, 1.0f, N);
            }
    return 0;
}

}  // extern "C"
