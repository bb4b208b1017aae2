// Neighbourhood attention on the CPU (fp32), forward and backward, computed per query instead of per tile.
//
// On an H x W map (1-D: H = 1), query (r, c) attends to the kh x kw keys (rs[r] + dh a, cs[c] + dw b): rs and cs
// hold each row's and column's window start (the window keeps its size and shifts inward at the borders; dilated
// positions form interleaved groups). Tiling this wastes work: a tile's key region is the union of its queries'
// windows, so a 4 x 4 query tile with a 7 x 7 kernel computes 100 logits per query for 49 useful ones.
//
// Here the operands are channel-first (each channel an H x W plane, rows W floats apart) and one vector holds 16
// neighbouring queries of a row, one per lane. Away from the borders, the key of offset (a, b) of those 16 queries
// is 16 consecutive floats of one key row, so logits, softmax and the weighted sum of values are vertical vector
// operations over the lanes: no masked logits, no transposes, no horizontal sums. In blocks whose windows touch a
// border (lanes then share key columns) the keys are permuted into the lanes from two loads; in the backward the
// lanes' contributions to dk and dv are permuted out into the key columns, in rounds of lanes whose columns differ.
//
// The backward recomputes p from the saved log-sum-exp (as the tile kernel does); each thread owns whole
// (batch, head) planes, so the += into shared key columns never race.

#include "vec.h"

namespace {

// A channel-first operand: row r of channel c of (batch, head) is W floats with unit stride at
// p + batch sb + head sh + c sc + r sr; bh = batch * heads + head.
template <class T>
struct Planes {
    T* p = nullptr;
    int64_t sb = 0, sh = 0, sc = 0, sr = 0, heads = 1;
    T* at(int64_t bh, int64_t c, int64_t r) const { return p + bh / heads * sb + bh % heads * sh + c * sc + r * sr; }
};

struct Geo {
    int64_t BH, D, Dv, H, W, kh, kw, dh, dw;
    const int32_t *rs, *cs;
    float scale;
};

// 16 neighbouring queries of a row (columns c0 .. c0 + 15).
struct Lanes {
    int64_t c0;
    bool uniform;  // lane j's window starts at column base + j (no border in the block)
    int64_t base;  // otherwise: the first of 32 key columns that hold every lane's window start
    vi slot;       // otherwise: lane j's window start - base
    // Otherwise, when every lane's whole window lies in 32 columns (small kernels): lane j's key of column offset b
    // is column wbase + span[b][j], so one pair of loads per key row serves every offset.
    int64_t wbase;
    std::vector<vi> span;
    vi active;     // -1 where lane j is this block's query (a row's last block repeats earlier columns when 16 does
                   // not divide W: those lanes are computed again but not counted twice in the backward)
    // Otherwise, for the backward: round t adds lane from[t][h][i] into key column base + 16 h + i where has[..].
    std::vector<vi> from, has;  // 2 per round
};

// The column blocks of a row; false when the kernel cannot take this geometry (W < 16, or a border block whose
// window starts span more than the 32 columns two loads cover; the caller then uses the tile kernel).
bool column_blocks(const Geo& g, std::vector<Lanes>& out) {
    out.clear();
    if (g.W < VL) return false;
    const int64_t reach = g.dw * (g.kw - 1);  // a window's last column - its first
    for (int64_t next = 0; next < g.W; next += VL) {
        Lanes L;
        L.c0 = std::min(next, g.W - VL);
        const int32_t* cs = g.cs + L.c0;
        int32_t lo = cs[0], hi = cs[0];
        L.uniform = true;
        for (int j = 0; j < VL; ++j) {
            L.active[j] = L.c0 + j >= next ? -1 : 0;
            lo = std::min(lo, cs[j]);
            hi = std::max(hi, cs[j]);
            L.uniform = L.uniform && cs[j] == cs[0] + j;
        }
        if (L.uniform) {
            L.base = cs[0];
            L.slot = vi{};
        } else {
            L.base = std::min<int64_t>(lo, g.W - 2 * VL - reach);  // two loads at base + offset stay in the row
            L.wbase = std::min<int64_t>(lo, g.W - 2 * VL);
            if (L.base < 0 || hi - L.base >= 2 * VL) return false;
            int rank[VL], rounds = 0;
            for (int j = 0; j < VL; ++j) {
                L.slot[j] = cs[j] - (int32_t)L.base;
                rank[j] = 0;
                if (!L.active[j]) continue;
                for (int i = 0; i < j; ++i) rank[j] += L.active[i] && cs[i] == cs[j];
                rounds = std::max(rounds, rank[j] + 1);
            }
            if (hi - L.wbase + reach < 2 * VL)
                for (int64_t b = 0; b < g.kw; ++b) L.span.push_back(L.slot + (int32_t)(L.base - L.wbase + g.dw * b));
            L.from.assign(2 * rounds, vi{});
            L.has.assign(2 * rounds, vi{});
            for (int j = 0; j < VL; ++j) {
                if (!L.active[j]) continue;
                const int s = L.slot[j];
                L.from[2 * rank[j] + s / VL][s % VL] = j;
                L.has[2 * rank[j] + s / VL][s % VL] = -1;
            }
        }
        out.push_back(std::move(L));
    }
    return true;
}

// The 16 lanes' keys of column offset `off` in one key row.
template <bool U>
inline vf keys(const float* row, int64_t off, const Lanes& L) {
    if (U) return load(row + L.base + off);
    return __builtin_shuffle(load(row + L.base + off), load(row + L.base + off + VL), L.slot);
}

// Calls f(std::integral_constant<int, n>, first) over [0, total) in chunks of at most 8 (8 accumulators and their
// operands fit the registers).
template <class F>
inline void chunks(int64_t total, F&& f) {
    int64_t i = 0;
    for (; i + 8 <= total; i += 8) f(std::integral_constant<int, 8>{}, i);
    upto8(total - i, [&](auto n) { f(n, i); });
}

// R query rows (1 or 2) computed together because they read the same key rows, so each key vector loaded serves
// both (loads, not FMAs, bound these loops): the band's key row t is krow[t]; query row i's window row a is the
// band's key row a + shift[i]. Key rows a row does not use are computed against zero weights / into scratch.
struct Band {
    int64_t r[2], shift[2], nt;
    std::vector<int64_t> krow;
};

// The band of query rows r0 and (R = 2) r1 = r0 + dh, whose windows start at most one key row apart.
inline void make_band(const Geo& g, int R, int64_t r0, Band& band) {
    const int64_t step = R == 2 ? (g.rs[r0 + g.dh] - g.rs[r0]) / g.dh : 0;
    band.r[0] = r0;
    band.r[1] = r0 + g.dh;
    band.shift[0] = 0;
    band.shift[1] = step;
    band.nt = g.kh + step;
    band.krow.resize(band.nt);
    for (int64_t t = 0; t < band.nt; ++t) band.krow[t] = g.rs[r0] + g.dh * t;
}

// S_i[a][b] = sum over channels c of x_i,c (16 query lanes of row i) * the lanes' keys of offset (a, b) in y's
// channel c: q k^T (and dO v^T in the backward). x_i: channel 0 at the block's queries; xs: the channel stride.
// One pass over the channels per key row and chunk of up to 8 column offsets.
template <int R, bool U>
void dots(const Geo& g, int64_t C, const float* const* x, int64_t xs, const Planes<const float>& y, int64_t bh,
          const Band& band, const Lanes& L, float* const* S, float* scratch) {
    const int64_t ys = y.sc;
    for (int64_t t = 0; t < band.nt; ++t) {
        const float* yt = y.at(bh, 0, band.krow[t]);
        float* dst[R];
        for (int i = 0; i < R; ++i) {
            const int64_t a = t - band.shift[i];
            dst[i] = a >= 0 && a < g.kh ? S[i] + a * g.kw * VL : scratch;
        }
        chunks(g.kw, [&](auto nb, int64_t b0) {
            constexpr int NB = decltype(nb)::value;
            vf acc[R][NB];
            for (int i = 0; i < R; ++i)
                for (int b = 0; b < NB; ++b) acc[i][b] = splat(0.0f);
            const bool window = !U && !L.span.empty();  // border block, small kernel: one 32-column window
            for (int64_t c = 0; c < C; ++c) {
                vf xv[R];
                for (int i = 0; i < R; ++i) xv[i] = load(x[i] + c * xs);
                const float* yc = yt + c * ys;
                vf w0, w1;
                if (window) w0 = load(yc + L.wbase), w1 = load(yc + L.wbase + VL);
                for (int b = 0; b < NB; ++b) {
                    const vf key = window ? __builtin_shuffle(w0, w1, L.span[b0 + b])
                                          : in_register(keys<U>(yc, (b0 + b) * g.dw, L));
                    for (int i = 0; i < R; ++i) acc[i][b] += xv[i] * key;
                }
            }
            for (int i = 0; i < R; ++i)
                for (int b = 0; b < NB; ++b) store(dst[i] + (b0 + b) * VL, acc[i][b]);
        });
    }
}

// emit(i, c, sum over (a, b) of P_i[a][b] * the lanes' keys of offset (a, b) in y's channel c) for every row i and
// channel c < C: p v (and dS k in the backward). Each chunk of up to 8 channels keeps its sums in registers over
// all offsets. zero: kw zero vectors (the weights of a key row that a query row does not use).
template <int R, bool U, class E>
void weighted(const Geo& g, int64_t C, const float* const* P, const Planes<const float>& y, int64_t bh,
              const Band& band, const Lanes& L, const float* zero, E&& emit) {
    const int64_t ys = y.sc;
    chunks(C, [&](auto nc, int64_t c0) {
        constexpr int NC = decltype(nc)::value;
        vf acc[R][NC];
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < NC; ++c) acc[i][c] = splat(0.0f);
        for (int64_t t = 0; t < band.nt; ++t) {
            const float* yt = y.at(bh, c0, band.krow[t]);
            const float* pt[R];
            for (int i = 0; i < R; ++i) {
                const int64_t a = t - band.shift[i];
                pt[i] = a >= 0 && a < g.kh ? P[i] + a * g.kw * VL : zero;
            }
            for (int64_t b = 0; b < g.kw; ++b) {
                vf p[R];
                for (int i = 0; i < R; ++i) p[i] = load(pt[i] + b * VL);
                for (int c = 0; c < NC; ++c) {
                    const vf key = in_register(keys<U>(yt + c * ys, b * g.dw, L));
                    for (int i = 0; i < R; ++i) acc[i][c] += p[i] * key;
                }
            }
        }
        for (int i = 0; i < R; ++i)
            for (int c = 0; c < NC; ++c) emit(i, c0 + c, acc[i][c]);
    });
}

// The transpose of weighted(): the lanes' key of offset (a, b) in y's channel c += P[a][b] * x_c, for every channel
// (dv += p^T dO, dk += dS^T q). Border blocks permute the lanes out into key columns, one round per lane rank.
template <bool U>
void scatter(const Geo& g, int64_t C, const float* P, const float* x, int64_t xs, const Planes<float>& y, int64_t bh,
             const int64_t* krow, const Lanes& L, float xscale) {
    const int64_t ys = y.sc;
    const int rounds = (int)L.from.size() / 2;
    chunks(C, [&](auto nc, int64_t c0) {
        constexpr int NC = decltype(nc)::value;
        vf xv[NC];
        for (int c = 0; c < NC; ++c) xv[c] = load(x + (c0 + c) * xs) * xscale;
        for (int64_t a = 0; a < g.kh; ++a) {
            float* ya = y.at(bh, c0, krow[a]) + L.base;
            for (int64_t b = 0; b < g.kw; ++b) {
                const vf p = load(P + (a * g.kw + b) * VL);
                for (int c = 0; c < NC; ++c) {
                    float* t = ya + c * ys + b * g.dw;
                    const vf add = p * xv[c];
                    if (U) {
                        store(t, load(t) + add);
                        continue;
                    }
                    for (int r = 0; r < rounds; ++r)
                        for (int h = 0; h < 2; ++h) {
                            const vi part = (vi)__builtin_shuffle(add, L.from[2 * r + h]) & L.has[2 * r + h];
                            store(t + h * VL, load(t + h * VL) + (vf)part);
                        }
                }
            }
        }
    });
}

struct Operands {
    Planes<const float> q, k, v, out, dout;
    Planes<float> o, dq, dk, dv;
    float* lse;              // (BH, H, W) contiguous, written by the forward
    const float* lse_saved;  // read by the backward
};

// Forward of one column block of the band's R query rows.
template <int R, bool U>
void block_forward(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Lanes& L, float* const* S,
                   float* scratch) {
    const int64_t c0 = L.c0, n = g.kh * g.kw;
    const float* x[R];
    for (int i = 0; i < R; ++i) x[i] = X.q.at(bh, 0, band.r[i]) + c0;
    dots<R, U>(g, g.D, x, X.q.sc, X.k, bh, band, L, S, scratch);
    vf inv[R];
    for (int i = 0; i < R; ++i) {  // unnormalised p in place; every query sees kh * kw keys
        vf m = load(S[i]);
        for (int64_t j = 1; j < n; ++j) m = vmax(m, load(S[i] + j * VL));
        vf sum = splat(0.0f);
        for (int64_t j = 0; j < n; ++j) {
            const vf e = vexp((load(S[i] + j * VL) - m) * g.scale);
            store(S[i] + j * VL, e);
            sum += e;
        }
        inv[i] = 1.0f / sum;
        store(X.lse + (bh * g.H + band.r[i]) * g.W + c0, m * g.scale + vlog(sum));
    }
    weighted<R, U>(g, g.Dv, S, X.v, bh, band, L, scratch + g.kw * VL, [&](int i, int64_t c, vf acc) {
        store(X.o.at(bh, c, band.r[i]) + c0, acc * inv[i]);
    });
}

// Backward of one column block of one query row (band of R = 1).
template <bool U>
void block_backward(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Lanes& L, float* P,
                    float* dS, float* scratch) {
    const int64_t r = band.r[0], c0 = L.c0, n = g.kh * g.kw;
    const float* xq = X.q.at(bh, 0, r) + c0;
    const float* xdo = X.dout.at(bh, 0, r) + c0;
    dots<1, U>(g, g.D, &xq, X.q.sc, X.k, bh, band, L, &P, scratch);
    const vf lse = load(X.lse_saved + (bh * g.H + r) * g.W + c0);
    for (int64_t i = 0; i < n; ++i) {  // p = exp(scale s - lse); 0 on lanes another block owns
        const vf p = vexp(load(P + i * VL) * g.scale - lse);
        store(P + i * VL, L.active ? p : splat(0.0f));
    }
    dots<1, U>(g, g.Dv, &xdo, X.dout.sc, X.v, bh, band, L, &dS, scratch);  // dp = dO v^T
    vf delta = splat(0.0f);  // rowsum(dO * O)
    for (int64_t c = 0; c < g.Dv; ++c) delta += load(X.dout.at(bh, c, r) + c0) * load(X.out.at(bh, c, r) + c0);
    for (int64_t i = 0; i < n; ++i) store(dS + i * VL, load(P + i * VL) * (load(dS + i * VL) - delta));
    const float* ds = dS;
    weighted<1, U>(g, g.D, &ds, X.k, bh, band, L, nullptr, [&](int, int64_t c, vf acc) {  // dq = scale dS k
        float* dq = X.dq.at(bh, c, r) + c0;
        store(dq, L.active ? acc * g.scale : load(dq));
    });
    scatter<U>(g, g.Dv, P, xdo, X.dout.sc, X.dv, bh, band.krow.data(), L, 1.0f);
    scatter<U>(g, g.D, dS, xq, X.q.sc, X.dk, bh, band.krow.data(), L, g.scale);
}

Geo geometry(const int64_t* sizes, const int32_t* rs, const int32_t* cs, float scale) {
    return Geo{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], sizes[8],
               rs, cs, scale};
}

template <class T>
Planes<T> planes(void* const* ptrs, const int64_t* strides, int i, const int64_t* sizes) {
    const int64_t* st = strides + 4 * i;
    return Planes<T>{static_cast<T*>(ptrs[i]), st[0], st[1], st[2], st[3], sizes[9]};
}

// q, k, v: operands 0-2 of both directions.
Operands inputs(void* const* ptrs, const int64_t* strides, const int64_t* sizes) {
    Operands X{};
    X.q = planes<const float>(ptrs, strides, 0, sizes);
    X.k = planes<const float>(ptrs, strides, 1, sizes);
    X.v = planes<const float>(ptrs, strides, 2, sizes);
    return X;
}

}  // namespace

extern "C" {

// 1 when the kernel takes this geometry, else 0 (see column_blocks). sizes: [B * heads, D, Dv, H, W, kh, kw, dh,
// dw, heads].
int attnlab_na_supported(const int64_t* sizes, const int32_t* cs) {
    std::vector<Lanes> blocks;
    return column_blocks(geometry(sizes, nullptr, cs, 1.0f), blocks) ? 1 : 0;
}

// ptrs q, k, v, o, lse with strides [batch, head, channel, row] each (lse: contiguous (B, heads, H, W), its strides
// unused); columns have unit stride.
// rs (H) and cs (W): each row's and column's window start. Returns 0, or -1 for a geometry it does not take.
int attnlab_na_forward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                       const int32_t* rs, const int32_t* cs, int threads) {
    const Geo g = geometry(sizes, rs, cs, scale);
    std::vector<Lanes> blocks;
    if (!column_blocks(g, blocks)) return -1;
    Operands X = inputs(ptrs, strides, sizes);
    X.o = planes<float>(ptrs, strides, 3, sizes);
    X.lse = static_cast<float*>(ptrs[4]);
    // Work items: (bh, band, part of the row's blocks). Bands pair rows r and r + dh (same dilation group) whose
    // windows start at most one key row apart; a 1-D input (one row) is split along the row instead.
    std::vector<std::pair<int64_t, int>> bands;  // (first row, rows)
    for (int64_t r0 = 0; r0 < g.H; ++r0) {
        if (r0 / g.dh % 2) continue;  // the second row of a pair
        const bool pair = r0 + g.dh < g.H && (g.rs[r0 + g.dh] == g.rs[r0] || g.rs[r0 + g.dh] == g.rs[r0] + g.dh);
        bands.push_back({r0, pair ? 2 : 1});
        if (!pair && r0 + g.dh < g.H) bands.push_back({r0 + g.dh, 1});
    }
    const int64_t nb = (int64_t)blocks.size(), nbands = (int64_t)bands.size();
    const int64_t items = std::max<int64_t>(1, g.BH * nbands);
    const int64_t parts = std::min<int64_t>(nb, std::max<int64_t>(1, 4 * threads / items));
    parallel(g.BH * nbands * parts, threads, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(2 * g.kh * g.kw * VL + 2 * g.kw * VL, 0.0f);
        float* S[2] = {buf.data(), buf.data() + g.kh * g.kw * VL};
        float* scratch = buf.data() + 2 * g.kh * g.kw * VL;  // kw vectors of scratch, then kw zero vectors
        Band band;
        for (int64_t it = begin; it < end; ++it) {
            const int64_t part = it % parts, k = it / parts % nbands, bh = it / parts / nbands;
            const int R = bands[k].second;
            make_band(g, R, bands[k].first, band);
            for (int64_t i = nb * part / parts; i < nb * (part + 1) / parts; ++i) {
                const Lanes& L = blocks[i];
                if (R == 2) {
                    if (L.uniform) block_forward<2, true>(g, X, bh, band, L, S, scratch);
                    else block_forward<2, false>(g, X, bh, band, L, S, scratch);
                } else {
                    if (L.uniform) block_forward<1, true>(g, X, bh, band, L, S, scratch);
                    else block_forward<1, false>(g, X, bh, band, L, S, scratch);
                }
            }
        }
    });
    return 0;
}

// ptrs q, k, v, o, lse, dout, dq, dk, dv (strides as the forward); dk and dv are added into (the caller zeroes
// them), dq is written. One thread per (batch, head) plane.
int attnlab_na_backward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                        const int32_t* rs, const int32_t* cs, int threads) {
    const Geo g = geometry(sizes, rs, cs, scale);
    std::vector<Lanes> blocks;
    if (!column_blocks(g, blocks)) return -1;
    Operands X = inputs(ptrs, strides, sizes);
    X.out = planes<const float>(ptrs, strides, 3, sizes);
    X.lse_saved = static_cast<const float*>(ptrs[4]);
    X.dout = planes<const float>(ptrs, strides, 5, sizes);
    X.dq = planes<float>(ptrs, strides, 6, sizes);
    X.dk = planes<float>(ptrs, strides, 7, sizes);
    X.dv = planes<float>(ptrs, strides, 8, sizes);
    parallel(g.BH, threads, [&](int64_t begin, int64_t end) {
        std::vector<float> P(g.kh * g.kw * VL), dS(g.kh * g.kw * VL), scratch(g.kw * VL);
        Band band;
        for (int64_t bh = begin; bh < end; ++bh)
            for (int64_t r = 0; r < g.H; ++r) {
                make_band(g, 1, r, band);
                for (const Lanes& L : blocks) {
                    if (L.uniform) block_backward<true>(g, X, bh, band, L, P.data(), dS.data(), scratch.data());
                    else block_backward<false>(g, X, bh, band, L, P.data(), dS.data(), scratch.data());
                }
            }
    });
    return 0;
}

}  // extern "C"
