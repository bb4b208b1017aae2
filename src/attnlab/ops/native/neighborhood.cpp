// Neighbourhood attention on the CPU (fp32), forward and backward, computed per query instead of per tile.
//
// On an H x W map (1-D: H = 1), query (r, c) attends to the kh x kw keys (rs[r] + dh a, cs[c] + dw b): rs and cs
// hold each row's and column's window start (the window keeps its size and shifts inward at the borders; dilated
// positions form interleaved groups). Tiling this wastes work: a tile's key region is the union of its queries'
// windows, so a 4 x 4 query tile with a 7 x 7 kernel computes 100 logits per query for 49 useful ones.
//
// Here the operands are channel-first (each channel an H x W plane, rows W floats apart) and one vector holds VL
// (16 with AVX-512, 8 with AVX2) neighbouring queries of a row, one per lane. Away from the borders, the key of
// offset (a, b) of those VL queries is VL consecutive floats of one key row, so logits, softmax and the weighted sum
// of values are vertical vector operations over the lanes: no masked logits, no transposes, no horizontal sums. In
// blocks whose windows touch a border (lanes then share key columns) the keys are permuted into the lanes from one or
// two loads; the forward reads the border blocks of a centred kernel as regular ones instead, from a copy of their
// columns wrapped around the border (Wrapped).
//
// The backward recomputes p from the saved log-sum-exp (as the tile kernel does) and gets dq per block like the
// forward's output. dk and dv are gathered per key instead of scattered per query: a "regular" query (window start
// = column - dw (kw / 2), every query away from a border) sees key column x at offset b exactly when it sits at
// column x + dw (kw / 2) - dw b, so with a query row's p and dS kept in padded row buffers, VL neighbouring keys
// sum their kw contributions in registers and are written once. Border queries add theirs by permutes into the key
// columns, in rounds of lanes whose columns differ. Each thread owns whole (batch, head) planes, so the += into
// key rows never race.

#include <unistd.h>

#include "vec.h"

namespace {

// A channel-first operand: row r of channel c of (batch, head) is W floats with unit stride at
// p + batch sb + head sh + c sc + r sr; bh = batch * heads + head.
template <class T>
struct Planes {
    T* p = nullptr;
    int64_t sb = 0, sh = 0, sc = 0, sr = 0, heads = 1;
    // The plane of (batch, head) bh, addressed by (channel, row). Each call site takes it once: splitting bh into
    // batch and head is an integer division, ~10% of k = 7's forward when it was done per channel store.
    struct Plane {
        T* p;
        int64_t sc, sr;
        T* at(int64_t c, int64_t r) const { return p + c * sc + r * sr; }
    };
    Plane plane(int64_t bh) const { return Plane{p + bh / heads * sb + bh % heads * sh, sc, sr}; }
};
using Plane = Planes<const float>::Plane;

struct Geo {
    int64_t BH, D, Dv, H, W, kh, kw, dh, dw;
    const int32_t *rs, *cs;
    float scale;
    bool stream;  // the operands are larger than the caches (see Trickle and stream_store)
    int64_t centre() const { return dw * (kw / 2); }  // a regular query's column - its window start
    int64_t reach() const { return dw * (kw - 1); }   // a window's last column - its first
};

// VL neighbouring queries of a row (columns c0 .. c0 + VL - 1).
struct Lanes {
    int64_t c0;
    bool uniform;  // every lane regular: lane j's window starts at column base + j (no border in the block)
    int64_t base;  // otherwise: the first of 2 VL key columns that hold every lane's window start (VL if single)
    bool single;   // otherwise: the window starts lie in VL columns (a border block whose clamped lanes share a
                   // regular lane's window): each key is one load and a one-vector permute, not two and a two-vector
                   // one (k = 7: 4% off the forward, k = 13: 8%)
    vi slot;       // otherwise: lane j's window start - base
    // Otherwise, when every lane's whole window lies in 32 columns (small kernels): lane j's key of column offset b
    // is column wbase + span[b][j], so one pair of loads per key row serves every offset.
    int64_t wbase;
    std::vector<vi> span;
    int wrap = -1;  // otherwise: its index among the row's wrapped blocks (Columns::wrapped), or -1
    vi active;     // -1 where lane j is this block's query (a row's last block repeats earlier columns when VL does
                   // not divide W: those lanes are computed again but not counted twice in the backward)
    vi gathered;   // -1 where lane j is active and regular: its dk, dv contributions are gathered per key
    // the other active lanes: (lane, index among the row's border queries)
    std::vector<std::pair<int, int64_t>> border;
};

// A wrapped block: a border block of a centred kernel with dilation 1 (lane j's window starts at
// clamp(c - centre, 0, W - kw), c its column), in the forward. Its lanes read keys as a regular block's do, columns
// c - centre + b for b < kw, from a copy of its columns [c0 - centre, c0 - centre + nvec VL) in which a column x < 0
// holds column x + kw and x >= W holds x - kw. A lane clamped at the left border (c < centre) then reads columns
// [0, c - centre + kw) as they are and [c - centre, 0) as [c - centre + kw, kw): together its window [0, kw), each
// key once, in another order of b; at the right border likewise. Its logits, softmax and weighted sum run over the
// same keys and values in the same order, so its output and log-sum-exp are its window's, with no permute per key
// load (one or two vpermps each made a border block twice the time of a regular one on a Zen 1, 8% of k = 7's
// forward; session 17). The backward keeps the permutes: its dk and dv sums need p in window order.
struct Wrapped {
    Lanes view;  // the block as a regular one reading the copy: uniform, base 0, wrap set
    // vector i of a key row's copy: lanes `index` of load(row + from) (and of load(row + from + VL) when `two`)
    struct Piece {
        int64_t from;
        vi index;
        bool plain, two;  // plain: index is 0, 1, ..., VL - 1 (a load)
    };
    std::vector<Piece> pieces;
    int64_t lo, hi;  // the columns the pieces load: [lo, hi)
};

// The block as a wrapped one (see Wrapped), or false: the lanes' starts are not the centred kernel's, or a piece of
// the copy would need keys from more than two vectors (kernels wider than about VL).
bool wrap_block(const Geo& g, const Lanes& L, int index, Wrapped& w) {
    if (g.dw != 1 || g.W < 2 * VL) return false;
    for (int j = 0; j < VL; ++j)
        if (g.cs[L.c0 + j] != std::clamp<int64_t>(L.c0 + j - g.centre(), 0, g.W - g.kw)) return false;
    const int64_t x0 = L.c0 - g.centre(), nvec = (VL + g.kw - 1 + VL - 1) / VL;
    w.pieces.clear();
    w.lo = g.W, w.hi = 0;
    for (int64_t i = 0; i < nvec; ++i) {
        int64_t src[VL], lo = g.W, hi = -1;
        for (int l = 0; l < VL; ++l) {
            const int64_t x = x0 + i * VL + l;  // lanes past the last column read are never used: any column will do
            src[l] = std::clamp<int64_t>(x < 0 ? x + g.kw : x >= g.W ? x - g.kw : x, 0, g.W - 1);
            lo = std::min(lo, src[l]), hi = std::max(hi, src[l]);
        }
        Wrapped::Piece p{std::min(lo, g.W - 2 * VL), vi{}, true, false};
        if (hi - p.from >= 2 * VL) return false;
        for (int l = 0; l < VL; ++l) {
            p.index[l] = int32_t(src[l] - p.from);
            p.plain = p.plain && p.index[l] == l;
            p.two = p.two || p.index[l] >= VL;
        }
        w.lo = std::min(w.lo, p.from), w.hi = std::max(w.hi, p.from + (p.two ? 2 : 1) * VL);
        w.pieces.push_back(p);
    }
    w.view = L;
    w.view.uniform = true;
    w.view.base = 0;
    w.view.wrap = index;
    return true;
}

// The column blocks of a row, and its border queries (active, not regular), in column order; runs of them share a
// window start (the queries whose window was clamped at a border): run i is [runs[i], runs[i + 1]).
struct Columns {
    std::vector<Lanes> blocks;
    std::vector<int64_t> border, runs;
    std::vector<Wrapped> wrapped;  // the wrapped blocks (Lanes::wrap indexes them)
};

// The columns of a row; false when the kernel cannot take this geometry (W < VL, or a border block whose window
// starts span more than the 2 VL columns two loads cover; the caller then uses the tile kernel).
bool column_blocks(const Geo& g, Columns& cols) {
    std::vector<Lanes>& out = cols.blocks;
    out.clear();
    cols.border.clear();
    cols.runs.clear();
    cols.wrapped.clear();
    if (g.W < VL) return false;
    const int64_t reach = g.reach();
    for (int64_t next = 0; next < g.W; next += VL) {
        Lanes L;
        L.c0 = std::min(next, g.W - VL);
        const int32_t* cs = g.cs + L.c0;
        int32_t lo = cs[0], hi = cs[0];
        L.uniform = true;
        for (int j = 0; j < VL; ++j) {
            const bool regular = cs[j] == L.c0 + j - g.centre();
            L.active[j] = L.c0 + j >= next ? -1 : 0;
            L.gathered[j] = L.active[j] && regular ? -1 : 0;
            lo = std::min(lo, cs[j]);
            hi = std::max(hi, cs[j]);
            L.uniform = L.uniform && regular;
        }
        if (L.uniform) {
            L.base = cs[0];
            L.slot = vi{};
        } else {
            L.base = std::min<int64_t>(lo, g.W - 2 * VL - reach);  // two loads at base + offset stay in the row
            L.wbase = std::min<int64_t>(lo, g.W - 2 * VL);
            if (L.base < 0 || hi - L.base >= 2 * VL) return false;
            const int64_t base1 = std::min<int64_t>(lo, g.W - VL - reach);  // one load at base1 + offset, the same
            L.single = hi - base1 < VL;
            if (L.single) L.base = base1;
            for (int j = 0; j < VL; ++j) {
                L.slot[j] = cs[j] - (int32_t)L.base;
                if (!L.active[j] || L.gathered[j]) continue;
                const int64_t c = L.c0 + j;
                if (cols.border.empty() || g.cs[cols.border.back()] != cs[j]) cols.runs.push_back(cols.border.size());
                L.border.push_back({j, (int64_t)cols.border.size()});
                cols.border.push_back(c);
            }
            if (hi - L.wbase + reach < 2 * VL)
                for (int64_t b = 0; b < g.kw; ++b) L.span.push_back(L.slot + (int32_t)(L.base - L.wbase + g.dw * b));
            Wrapped w;
            if (wrap_block(g, L, (int)cols.wrapped.size(), w)) {
                L.wrap = w.view.wrap;
                cols.wrapped.push_back(std::move(w));
            }
        }
        out.push_back(std::move(L));
    }
    cols.runs.push_back(cols.border.size());
    return true;
}

// The VL lanes' keys of column offset `off` in one key row.
template <bool U>
inline vf keys(const float* row, int64_t off, const Lanes& L) {
    if (U) return load(row + L.base + off);
    if (L.single) return __builtin_shuffle(load(row + L.base + off), L.slot);
    return __builtin_shuffle(load(row + L.base + off), load(row + L.base + off + VL), L.slot);
}

// Calls f(std::integral_constant<int, n>, first) over [0, total) in chunks of at most CHUNK: MAXR rows x CHUNK
// accumulators and their operands fit the registers (3 x 8 of 32 registers; 3 x 4 of 16: on a Zen 1 (session 13)
// 7-9% faster than 2 x 6 at k = 7, 13 and 31, 2 x 6 itself equal to 2 x 5 and 3 x 3; session 12's Zen 3 had 2 x 6
// 12-15% faster than 3 x 4, measured before the equal chunks below and key_rows' inlining). NA_MAXR and NA_CHUNK
// override them for A/B builds (benchmarks/na_ab.cpp). The chunks are as equal as they can be (7 = 4 + 3, not
// 6 + 1): a chunk of one offset is a chain of dependent FMAs per row, one every FMA latency (A/B on a Zen 1, 2
// threads: k = 7 -11%, k = 13 -7%, k = 31 -8% in time).
#ifndef NA_CHUNK
#define NA_CHUNK (REGS >= 32 ? 8 : 4)
#endif
constexpr int CHUNK = NA_CHUNK;
template <class F>
inline void chunks(int64_t total, F&& f) {
    const int64_t n = (total + CHUNK - 1) / CHUNK;
    int64_t i = 0;
    for (int64_t j = 0; j < n; ++j) {
        const int64_t size = total / n + (j < total % n);
        upto<CHUNK>(size, [&](auto s) { f(s, i); });
        i += size;
    }
}

// R query rows (up to MAXR) computed together because they read the same key rows, so each key vector loaded
// serves all of them (loads, not FMAs, bound these loops): the band's key row t is krow[t]; query row i's window row
// a is the band's key row a + shift[i]. Each key row is computed for the rows whose windows include it, a range
// [lo, hi) of the band (shifts grow with i).
#ifndef NA_MAXR
#define NA_MAXR 3
#endif
// Band order (NA_BAND, on with 16 registers): on 2-D maps the forward computes the logits of all a band's column
// blocks (NA_DCH q/k channels at a time, accumulated into each block's S), then their softmaxes, then their outputs
// a chunk of CHUNK v channels at a time across the blocks, instead of each block from start to end. With 8-lane
// vectors a block's k and v lines (kh + 2 key rows x the channels x 2 lines) are more than a 32 KB L1, and the next
// block, 8 columns on, read them from L2 again; in band order a chunk's key rows stay in L1 across the blocks, for S
// of every block kept in memory (75 KB at k = 7: 3 rows of 128 columns). A/B harness on a Zen 3, 128 x 128, 8 heads
// of 64, 2 threads, NA_DCH 16: k = 7 46 -> 40 ms, k = 13 123 -> 93, k = 31 502 -> 403. Not measured with 32
// registers (16-lane blocks, sessions 10-11's tuning), so off there; off in 1-D, where a row's blocks are many and
// their S would not stay in L2. NA_DCH 64 (a 64-wide head's logits in one pass, S written once) measured 4-7% faster
// than 16 at k = 7 and 2-5% at k = 13 and 31 on a Zen 1 (session 13); the Zen 3 was measured with 16 only.
#ifndef NA_BAND
#define NA_BAND (REGS < 32)
#endif
#ifndef NA_DCH
#define NA_DCH 64
#endif
constexpr int MAXR = NA_MAXR;  // MAXR rows x CHUNK accumulators + their operands fill the registers
struct Band {
    int64_t r[MAXR], shift[MAXR], nt;
    bool staircase;  // shift[i] = i and kh >= R: row i uses key rows [i, i + kh) (every band away from the borders)
    std::vector<int64_t> krow;
    // [lo, hi): the band rows whose windows include key row t (empty: lo >= hi)
    void rows_using(const Geo& g, int R, int64_t t, int& lo, int& hi) const {
        lo = R;
        hi = 0;
        for (int i = 0; i < R; ++i)
            if (t - shift[i] >= 0 && t - shift[i] < g.kh) lo = std::min(lo, i), hi = i + 1;
    }
};

// The band of R query rows r0, r0 + dh, ... (row_bands: each starts its window 0 or dh key rows after the last).
inline void make_band(const Geo& g, int R, int64_t r0, Band& band) {
    for (int i = 0; i < R; ++i) {
        band.r[i] = r0 + i * g.dh;
        band.shift[i] = (g.rs[band.r[i]] - g.rs[r0]) / g.dh;
    }
    band.nt = g.kh + band.shift[R - 1];
    band.staircase = g.kh >= R;
    for (int i = 0; i < R; ++i) band.staircase = band.staircase && band.shift[i] == i;
    band.krow.resize(band.nt);
    for (int64_t t = 0; t < band.nt; ++t) band.krow[t] = g.rs[r0] + g.dh * t;
}

// f(LO, HI) as integral constants for the run-time range [lo, hi) of 0 <= lo < hi <= R: a loop over rows whose
// accumulators stay in registers needs the range at compile time.
template <int R, int LO = 0, int HI = 1, class F>
[[gnu::always_inline]] inline void row_range(int lo, int hi, F&& f) {
    if constexpr (LO < R) {
        if constexpr (HI <= R) {
            if (lo == LO && hi == HI) return f(std::integral_constant<int, LO>{}, std::integral_constant<int, HI>{});
            row_range<R, LO, HI + 1>(lo, hi, f);
        } else {
            row_range<R, LO + 1, LO + 2>(lo, hi, f);
        }
    }
}

// Memory the forward will read first in the next band (its new key rows of k and v, its query rows), prefetched into
// L2 a line or a few at a time, one step per channel of `dots`, while the current band computes: a steady trickle
// of misses in flight behind the arithmetic. `dots` takes a key row's worth of line addresses at a time (`take`), so
// that a channel's step is a compare and a prefetch. Measured on 128 x 128 maps with 8 heads of 64, kernel 7
// (docs/native.md, "Limits"): issuing the same prefetches in bursts at each block, or prefetching each next key row
// into L1, did not help; this did. Only while a band's keys and values leave room for the next band's in L2
// (trickle_fits): with larger kernels the extra lines evict ones still in use.
struct Trickle {
    struct Span {
        const char *at, *end;
    };
    std::vector<Span> spans;  // adjacent spans merged
    std::vector<const char*> batch;  // the lines of the last `take`
    size_t next = 0;
    int64_t per = 1;  // lines per channel step
    void clear() { spans.clear(), next = 0; }
    void add(const float* p, int64_t n) {
        const char *a = reinterpret_cast<const char*>(p), *b = reinterpret_cast<const char*>(p + n);
        if (!spans.empty() && spans.back().end == a) spans.back().end = b;
        else spans.push_back({a, b});
    }
    int64_t lines() const {
        int64_t n = 0;
        for (const Span& s : spans) n += (s.end - s.at + 63) / 64;
        return n;
    }
    // The lines for `steps` channel steps, across spans (fewer at the end, none when done). Spans need not be
    // adjacent: on planar operands ((B, heads, d, H, W) contiguous) each channel's row is its own span, and taking
    // from one span at a time prefetched an eighth of the next band.
    std::pair<const char* const*, int64_t> take(int64_t steps) {
        batch.clear();
        for (int64_t want = steps * per; want > 0 && next < spans.size();) {
            Span& s = spans[next];
            const int64_t left = (s.end - s.at + 63) / 64, n = std::min(want, left);
            for (int64_t j = 0; j < n; ++j) batch.push_back(s.at + 64 * j);
            s.at += 64 * n;
            want -= n;
            if (n == left) ++next;
        }
        return {batch.data(), (int64_t)batch.size()};
    }
};
using TrickleLines = std::pair<const char* const*, int64_t>;

// Channel step c of `steps` (C) over the lines taken from a Trickle: lines c, c + C, ...
inline void trickle_step(const TrickleLines& lines, int64_t c, int64_t steps) {
    for (int64_t j = c; j < lines.second; j += steps) __builtin_prefetch(lines.first[j], 0, 2);
}

// Calls f(std::integral_constant<int, b>{}) for b in [B0, B1).
template <int B0, int B1, class F>
inline void offsets(F&& f) {
    if constexpr (B0 < B1) {
        f(std::integral_constant<int, B0>{});
        offsets<B0 + 1, B1>(f);
    }
}

// A regular block (every lane regular, dilation 1) that starts on a vector boundary of a row, with an odd kernel of
// KW <= 7 columns: the lanes' keys of offset b are columns c0 - KW / 2 + b, one `shifted` of two of the aligned
// vectors at c0 - VL, c0 and c0 + VL, so each channel of a key row is three aligned loads instead of KW unaligned
// ones (each of which spans two cache lines; ~5% off k = 7's forward). 3 rows x 7 accumulators, the queries and the
// three vectors fill the registers, so wider kernels keep the general loop.
template <int KW, int B>
inline vf key_of(vf l, vf m, vf r) {
    constexpr int centre = KW / 2;
    if constexpr (B < centre) return shifted<VL - centre + B>(l, m);
    else if constexpr (B == centre) return m;
    else return shifted<B - centre>(m, r);
}

// f(std::integral_constant<int, KW>{}) for the usual small kernel widths (3, 5, 7), which some loops take at compile
// time; false for the others.
template <class F>
inline bool with_small_kw(int64_t kw, F&& f) {
    switch (kw) {
        case 3: f(std::integral_constant<int, 3>{}); return true;
        case 5: f(std::integral_constant<int, 5>{}); return true;
        case 7: f(std::integral_constant<int, 7>{}); return true;
    }
    return false;
}

// with_small_kw for the kernel widths key_of serves in `dots`; false for every width with 16 registers (3 x 7
// accumulators do not fit, and without `valignd` a shifted vector costs two or three shuffles, more than the
// unaligned load it replaces).
template <class F>
inline bool with_regular_kw(int64_t kw, F&& f) {
    if constexpr (REGS >= 32) return with_small_kw(kw, f);
    return false;
}

inline bool regular_aligned(const Geo& g, const Lanes& L) {
    return g.dw == 1 && L.wrap < 0 && L.c0 % VL == 0 && L.c0 >= VL && L.c0 + 2 * VL <= g.W;
}

// f(lo, hi, t, yt) for each key row t of the band: [lo, hi) the band rows whose windows include it, as integral
// constants; yt its channel c0 in y's plane yp. STAIR: the band is a staircase (the caller checked), so the ranges
// are known at compile time: [0, t + 1) for the first R - 1 key rows, then all rows, then [i, R) for the last R - 1,
// in one straight sequence with no run-time dispatch per key row (for `weighted_chunk`, whose sums stay in registers
// across the key rows: after a dispatch GCC spilled and reloaded them).
template <int R, bool STAIR = false, class P, class F>
[[gnu::always_inline]] inline void key_rows(const Geo& g, const Band& band, const P& yp, int64_t c0, F&& f) {
    using Zero = std::integral_constant<int, 0>;
    using All = std::integral_constant<int, R>;
    if constexpr (STAIR) {
        offsets<0, R - 1>([&](auto t) { f(Zero{}, std::integral_constant<int, t + 1>{}, t, yp.at(c0, band.krow[t])); });
        for (int64_t t = R - 1; t < g.kh; ++t) f(Zero{}, All{}, t, yp.at(c0, band.krow[t]));
        offsets<1, R>([&](auto i) { f(i, All{}, g.kh - 1 + i, yp.at(c0, band.krow[g.kh - 1 + i])); });
        return;
    }
    for (int64_t t = 0; t < band.nt; ++t) {
        const float* yt = yp.at(c0, band.krow[t]);
        int lo, hi;
        band.rows_using(g, R, t, lo, hi);
        row_range<R>(lo, hi, [&](auto lo_, auto hi_) { f(lo_, hi_, t, yt); });
    }
}

// One pass of `dots` over the channels for band rows [LO, HI) and one key row: acc[i][b] = the sum over channels c
// of x_i,c * key b of channel c, stored at dst[i] + b VL, for b < NB. keys(yc, f) calls f(b, key) for each b, from
// channel c's key row at yc. tr (may be null) takes a key row's worth of lines and steps once per channel.
template <int R, int NB, int LO, int HI, class K>
inline void dot_pass(int64_t C, const float* const* x, int64_t xs, const float* yt, int64_t ys, float* const* dst,
                     Trickle* tr, bool add, K&& keys) {
    vf acc[R][NB];
    for (int i = LO; i < HI; ++i)
        for (int b = 0; b < NB; ++b) acc[i][b] = add ? load(dst[i] + b * VL) : splat(0.0f);
    const TrickleLines lines = tr ? tr->take(C) : TrickleLines{nullptr, 0};
    for (int64_t c = 0; c < C; ++c) {
        trickle_step(lines, c, C);
        vf xv[R];
        for (int i = LO; i < HI; ++i) xv[i] = load(x[i] + c * xs);
        keys(yt + c * ys, [&](auto b, vf key) {
            for (int i = LO; i < HI; ++i) acc[i][b] += xv[i] * key;
        });
    }
    for (int i = LO; i < HI; ++i)
        for (int b = 0; b < NB; ++b) store(dst[i] + b * VL, acc[i][b]);
}

// S_i[a][b] = sum over channels c of x_i,c (VL query lanes of row i) * the lanes' keys of offset (a, b) in y's
// channel c: q k^T (and dO v^T in the backward). x_i: channel 0 at the block's queries; xs: the channel stride.
// One pass over the channels per key row and chunk of up to CHUNK column offsets, for the rows that use the key row;
// a regular aligned block of a kernel up to 7 wide (regular_aligned, with_regular_kw) does all its offsets in one
// pass, its keys by key_of.
// tr (the forward's, may be null) steps once per channel.
template <int R, bool U>
void dots(const Geo& g, int64_t C, const float* const* x0, int64_t xs, const Plane& yp, const Band& band,
          const Lanes& L, float* const* S, Trickle* tr, int64_t c0 = 0, bool add = false) {
    const int64_t ys = yp.sc;
    const bool aligned = U && regular_aligned(g, L);
    const float* x[R];
    for (int i = 0; i < R; ++i) x[i] = x0[i] + c0 * xs;
    key_rows<R>(g, band, yp, c0, [&](auto lo_, auto hi_, int64_t t, const float* yt) {
        constexpr int LO = decltype(lo_)::value, HI = decltype(hi_)::value;
        float* dst[R];
        for (int i = LO; i < HI; ++i) dst[i] = S[i] + (t - band.shift[i]) * g.kw * VL;
        if (aligned && with_regular_kw(g.kw, [&](auto kw) {  // three aligned loads and `valignd`s per channel
                constexpr int KW = decltype(kw)::value;
                dot_pass<R, KW, LO, HI>(C, x, xs, yt + L.c0, ys, dst, tr, add, [](const float* yc, auto&& f) {
                    const vf l = in_register(load(yc - VL)), m = in_register(load(yc)),
                             r = in_register(load(yc + VL));
                    offsets<0, KW>([&](auto b) { f(b, in_register(key_of<KW, decltype(b)::value>(l, m, r))); });
                });
            }))
            return;
        chunks(g.kw, [&](auto nb, int64_t b0) {
            constexpr int NB = decltype(nb)::value;
            float* at[R];
            for (int i = LO; i < HI; ++i) at[i] = dst[i] + b0 * VL;
            // border block, small kernel: one 2 VL column window, each key a permute of its two vectors, unless a
            // one-vector permute serves (`single`) and a two-vector one costs more (without AVX-512: two vpermps
            // and a blend; preferring `single` there measured 3% off k = 7's forward on a Zen 1)
            const bool window = !U && !L.span.empty() && !(L.single && !TWO_VECTOR_PERMUTE);
            Trickle* first = b0 == 0 ? tr : nullptr;  // the trickle steps in the first chunk's pass
            dot_pass<R, NB, LO, HI>(C, x, xs, yt, ys, at, first, add, [&](const float* yc, auto&& f) {
                vf w0, w1;
                if (window) w0 = load(yc + L.wbase), w1 = load(yc + L.wbase + VL);
                for (int b = 0; b < NB; ++b)
                    f(b, window ? __builtin_shuffle(w0, w1, L.span[b0 + b])
                                : in_register(keys<U>(yc, (b0 + b) * g.dw, L)));
            });
        });
    });
}

// emit(i, c, sum over (a, b) of P_i[a][b] * the lanes' keys of offset (a, b) in y's channel c) for every row i and
// channel c < C: p v (and dS k in the backward). Each chunk of up to CHUNK channels keeps its sums in registers over
// all offsets; each key row adds into the rows that use it. KW: the kernel's width when known at compile time (see
// weighted_rows), else 0.
template <int R, bool U, int NC, bool STAIR, int KW, class E>
void weighted_chunk(const Geo& g, int64_t c0, const float* const* P, const Plane& yp, const Band& band,
                    const Lanes& L, E&& emit) {
    const int64_t ys = yp.sc, kw = KW ? KW : g.kw;
    vf acc[R][NC];
    for (int i = 0; i < R; ++i)
        for (int c = 0; c < NC; ++c) acc[i][c] = splat(0.0f);
    key_rows<R, STAIR>(g, band, yp, c0, [&](auto lo_, auto hi_, int64_t t, const float* yt) {
        constexpr int LO = decltype(lo_)::value, HI = decltype(hi_)::value;
        const float* pt[R];
        for (int i = LO; i < HI; ++i) pt[i] = P[i] + (t - band.shift[i]) * kw * VL;
        for (int64_t b = 0; b < kw; ++b) {
            vf p[R];
            for (int i = LO; i < HI; ++i) p[i] = load(pt[i] + b * VL);
            for (int c = 0; c < NC; ++c) {
                const vf key = in_register(keys<U>(yt + c * ys, b * g.dw, L));
                for (int i = LO; i < HI; ++i) acc[i][c] += p[i] * key;
            }
        }
    });
    for (int i = 0; i < R; ++i)
        for (int c = 0; c < NC; ++c) emit(i, c0 + c, acc[i][c]);
}

// weighted_chunk for the band's kind (staircase or not). With 16 registers, a staircase band of the usual small
// kernels (3, 5, 7 wide) gets the width at compile time: its loop over the offsets then has a constant count, and GCC
// unrolls the band's first and last key rows (those of fewer query rows) into straight code. Against the run-time
// width (A/B harness, Zen 1, 2 threads, 128 x 128, 8 heads of 64): kernel 7 -1.3 to -2.6% of the forward's time,
// 5 -4%, 3 -9%; the source then takes ~15 s longer to compile (28 -> 43 s). Not with 32 registers: unmeasured there
// (no AVX-512 host since session 11), and that build's compile went from 69 to 116 s.
template <int R, bool U, int NC, class E>
void weighted_rows(const Geo& g, int64_t c0, const float* const* P, const Plane& yp, const Band& band, const Lanes& L,
                   E&& emit) {
    if (!band.staircase) return weighted_chunk<R, U, NC, false, 0>(g, c0, P, yp, band, L, emit);
    if constexpr (REGS < 32) {
        if (with_small_kw(g.kw, [&](auto kw) {
                weighted_chunk<R, U, NC, true, decltype(kw)::value>(g, c0, P, yp, band, L, emit);
            }))
            return;
    }
    weighted_chunk<R, U, NC, true, 0>(g, c0, P, yp, band, L, emit);
}

template <int R, bool U, class E>
void weighted(const Geo& g, int64_t C, const float* const* P, const Plane& yp, const Band& band, const Lanes& L,
              E&& emit) {
    chunks(C, [&](auto nc, int64_t c0) { weighted_rows<R, U, decltype(nc)::value>(g, c0, P, yp, band, L, emit); });
}

// The border queries' part of dk, dv for one query row: y(c, krow[a])[start + dw b] += sum over the queries of a
// run (one shared window start) of X(c)[query] * Wt[query][a][b]. Wt: per border query, kh rows of kwp = kw rounded
// up to whole vectors (zero beyond kw). A handful of queries per row, each run summed in registers before its keys
// are written once.
void border_add(const Geo& g, int64_t C, const float* Wt, const Planes<const float>& X, float xscale, int64_t r,
                const Planes<float>& y, int64_t bh, const int64_t* krow, const Columns& cols) {
    const int64_t kwp = round_up(g.kw), nq = (int64_t)cols.border.size();
    std::vector<float> xb(C * nq);  // the border queries' values, scaled: xb[c nq + i]
    const auto xp = X.plane(bh);
    const auto yp = y.plane(bh);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < nq; ++i) xb[c * nq + i] = xp.at(c, r)[cols.border[i]] * xscale;
    for (size_t run = 0; run + 1 < cols.runs.size(); ++run) {
        const int64_t i0 = cols.runs[run], i1 = cols.runs[run + 1], start = g.cs[cols.border[i0]];
        for (int64_t a = 0; a < g.kh; ++a)
            for (int64_t b0 = 0; b0 < g.kw; b0 += VL)
                chunks(C, [&](auto nc, int64_t c0) {  // NC channels at once: independent sums over the run
                    constexpr int NC = decltype(nc)::value;
                    vf acc[NC];
                    for (int c = 0; c < NC; ++c) acc[c] = splat(0.0f);
                    for (int64_t i = i0; i < i1; ++i) {
                        const vf w = load(Wt + (i * g.kh + a) * kwp + b0);
                        for (int c = 0; c < NC; ++c) acc[c] += xb[(c0 + c) * nq + i] * w;
                    }
                    const int64_t nb = std::min<int64_t>(VL, g.kw - b0);
                    for (int c = 0; c < NC; ++c) {
                        float* dst = yp.at(c0 + c, krow[a]) + start + g.dw * b0;
                        if (g.dw == 1 && nb == VL) {
                            store(dst, load(dst) + acc[c]);
                        } else {
                            for (int64_t l = 0; l < nb; ++l) dst[g.dw * l] += acc[c][l];
                        }
                    }
                });
    }
}

// A query row's values per window offset, by column, for the backward's gather: row (a, b) of kh kw rows of
// W + 2 pad floats, zero except at the gathered (regular) queries' columns.
struct RowBuffer {
    int64_t pad, ld;
    std::vector<float> v;
    RowBuffer(const Geo& g, int64_t rows) : pad(round_up(g.reach())), ld(g.W + 2 * pad), v(rows * ld, 0.0f) {}
    float* row(int64_t i) { return v.data() + i * ld + pad; }  // column 0 of row i
};

// The key rows krow[a] of y, channels [0, C): y(c, krow[a])[x] += sum_b Wt(a, b)[x + centre - dw b] * X(c)[same],
// for every key column x: each block of VL keys sums its kw contributions from the query row in registers and is
// written once (dv from p and dO, dk from dS and scale q). Queries that are not gathered have zero weights. Two key
// rows at a time: the query values X are the same for every key row, so each load of them serves both.
template <int A>
void gather_rows(const Geo& g, int64_t C, RowBuffer& Wt, RowBuffer& X, const Planes<float>& y, int64_t bh,
                 const int64_t* krow, int64_t a0, const Lanes& L) {
    const auto yp = y.plane(bh);
    chunks(C, [&](auto nc, int64_t c0) {
        constexpr int NC = decltype(nc)::value;
        vf acc[A][NC];
        for (int a = 0; a < A; ++a)
            for (int c = 0; c < NC; ++c) acc[a][c] = splat(0.0f);
        for (int64_t b = 0; b < g.kw; ++b) {
            const int64_t q = L.c0 + g.centre() - g.dw * b;  // the queries that see these keys at offset b
            vf p[A];
            for (int a = 0; a < A; ++a) p[a] = load(Wt.row((a0 + a) * g.kw + b) + q);
            for (int c = 0; c < NC; ++c) {
                const vf x = in_register(load(X.row(c0 + c) + q));
                for (int a = 0; a < A; ++a) acc[a][c] += p[a] * x;
            }
        }
        for (int a = 0; a < A; ++a)
            for (int c = 0; c < NC; ++c) {
                float* t = yp.at(c0 + c, krow[a0 + a]) + L.c0;
                store(t, load(t) + (L.active ? acc[a][c] : splat(0.0f)));
            }
    });
}

void gather_add(const Geo& g, int64_t C, RowBuffer& Wt, RowBuffer& X, const Planes<float>& y, int64_t bh,
                const int64_t* krow, const std::vector<Lanes>& blocks) {
    for (const Lanes& L : blocks) {
        int64_t a = 0;
        for (; a + 2 <= g.kh; a += 2) gather_rows<2>(g, C, Wt, X, y, bh, krow, a, L);
        if (a < g.kh) gather_rows<1>(g, C, Wt, X, y, bh, krow, a, L);
    }
}

struct Operands {
    Planes<const float> q, k, v, out, dout;
    Planes<float> o, dq, dk, dv;
    float* lse;              // (BH, H, W) contiguous, written by the forward
    const float* lse_saved;  // read by the backward
};

// The softmax of VL queries' n logits (n vectors at S, every query sees n keys; S vector-aligned): unnormalised p in
// place, the log-sum-exp stored at lse; returns 1 / the sums. p = 2^((s - max) scale log2 e), the scale folded into
// one FMA.
inline vf softmax_lanes(float* S, int64_t n, float scale, float* lse) {
    vf m = load(S);
    for (int64_t j = 1; j < n; ++j) m = vmax(m, load(S + j * VL));
    const float log2_scale = scale * LOG2E;
    const vf mc = m * log2_scale;
    vf sum = splat(0.0f);
    for (int64_t j = 0; j < n; ++j) {
        const vf e = vexp2(load(S + j * VL) * log2_scale - mc);
        store_aligned(S + j * VL, e);
        sum += e;
    }
    store(lse, m * scale + vlog(sum));
    return 1.0f / sum;
}

// The logits of one column block of the band's R query rows over channels [c0, c0 + C) of q and k, added to S when
// add (a later chunk of channels).
template <int R, bool U>
void block_dots(const Geo& g, const Plane& qp, const Plane& kp, const Band& band, const Lanes& L, float* const* S,
                Trickle* tr, int64_t c0, int64_t C, bool add) {
    const float* x[R];
    for (int i = 0; i < R; ++i) x[i] = qp.at(0, band.r[i]) + L.c0;
    dots<R, U>(g, C, x, qp.sc, kp, band, L, S, tr, c0, add);
}

// The block's softmax in place (unnormalised p), its lse stored; inv[i] = 1 / row i's sums.
template <int R>
void block_softmax(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Lanes& L, float* const* S,
                   vf* inv) {
    for (int i = 0; i < R; ++i)
        inv[i] = softmax_lanes(S[i], g.kh * g.kw, g.scale, X.lse + (bh * g.H + band.r[i]) * g.W + L.c0);
}

// Output row i of the block, channel c: acc / the row's sum, stored in the output plane op (past the caches when
// streaming).
inline void store_output(const Geo& g, const Planes<float>::Plane& op, const Band& band, const Lanes& L, int i,
                         int64_t c, vf acc, vf inv) {
    float* o = op.at(c, band.r[i]) + L.c0;
    if (g.stream) stream_store(o, acc * inv);  // written once, read by the next layer: not worth caching
    else store(o, acc * inv);
}

// The wrapped blocks' copies of the key rows of k and v (see Wrapped), kept per key row while the bands that read it
// pass: a direct-mapped ring, slot = row mod `slots`, each (slot, wrapped block) tagged with the (plane, row) it
// holds, so that a key row's copies are made once, not once per band (3 times at k = 7: that cost half the gain).
// slots = dh (kh + MAXR) keeps a band's rows in distinct slots.
struct WrapRing {
    int64_t slots = 0, nvec = 0, per = 0;  // per: floats of one (slot, wrapped block): D + Dv channels of nvec vectors
    std::vector<int64_t> tag;               // (slot, wrapped block): bh H + row, or -1
    std::vector<float> data;
    Band local;                             // the band with its key rows replaced by their slots

    WrapRing(const Geo& g, const Columns& cols)
        : slots(g.dh * (g.kh + MAXR)), nvec(cols.wrapped.empty() ? 0 : (int64_t)cols.wrapped[0].pieces.size()),
          per((g.D + g.Dv) * nvec * VL), tag(slots * cols.wrapped.size(), -1), data(tag.size() * per) {}

    // The copies of plane bh's key rows of the band for the wrapped blocks among blocks [i0, i1), made where missing;
    // `local` then holds the band with slots for rows.
    void fill(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Columns& cols, int64_t i0,
              int64_t i1) {
        const int64_t nw = (int64_t)cols.wrapped.size();
        auto wrapped = [](const Lanes& L) { return L.wrap >= 0; };
        if (std::none_of(cols.blocks.begin() + i0, cols.blocks.begin() + i1, wrapped)) return;  // (1-D: a call a block)
        const Plane kp = X.k.plane(bh), vp = X.v.plane(bh);
        local = band;
        for (int64_t t = 0; t < band.nt; ++t) {
            const int64_t row = band.krow[t], slot = row % slots;
            local.krow[t] = slot;
            for (int64_t i = i0; i < i1; ++i) {
                const int wi = cols.blocks[i].wrap;
                if (wi < 0 || tag[slot * nw + wi] == bh * g.H + row) continue;
                tag[slot * nw + wi] = bh * g.H + row;
                float* d = data.data() + (slot * nw + wi) * per;
                copy(cols.wrapped[wi], kp.at(0, row), kp.sc, g.D, d);
                copy(cols.wrapped[wi], vp.at(0, row), vp.sc, g.Dv, d + g.D * nvec * VL);
            }
        }
    }
    // Wrapped block w's copies of C channels of a key row (row: its channel 0, sc: the channel stride) to d, a piece
    // at a time: each loop over the channels does one kind of load (a branch per vector had cost a fifth of the
    // copies' time in cache on a Zen 1, session 18). The first reads of a new key row's border lines are prefetched
    // 8 channels ahead (the loads had stalled on them, a third of the copies' time on a Zen 1, session 17).
    void copy(const Wrapped& w, const float* row, int64_t sc, int64_t C, float* d) const {
        for (int64_t c = 0; c < std::min<int64_t>(C, 8); ++c) prefetch_span(row + c * sc + w.lo, w.hi - w.lo);
        for (int64_t j = 0; j < nvec; ++j) {
            const Wrapped::Piece& p = w.pieces[j];
            auto each = [&](auto piece) {  // the channel loop for one kind of piece
                const float* r = row + p.from;
                float* o = d + j * VL;
                for (int64_t c = 0; c < C; ++c, r += sc, o += nvec * VL) {
                    if (j == 0 && c + 8 < C) prefetch_span(row + (c + 8) * sc + w.lo, w.hi - w.lo);
                    store(o, piece(r));
                }
            };
            if (p.plain) each([](const float* r) { return load(r); });
            else if (p.two) each([&](const float* r) { return __builtin_shuffle(load(r), load(r + VL), p.index); });
            else each([&](const float* r) { return __builtin_shuffle(load(r), p.index); });
        }
    }
    // Wrapped block wi's copies of k (v: its channels after k's) as a plane addressed by (channel, slot).
    Plane plane(const Geo& g, int64_t wi, bool v) const {
        const int64_t nw = (int64_t)tag.size() / slots;
        return Plane{data.data() + wi * per + (v ? g.D * nvec * VL : 0), nvec * VL, nw * per};
    }
};

// Forward of the band's column blocks [i0, i1): the logits of every block a chunk of dch q and k channels at a time,
// their softmax, then their outputs a chunk of v channels at a time. One block with dch = D is the per-block order;
// all of a band's blocks the band order (NA_BAND: a v chunk's key rows stay in L1 across the blocks). With `stage`
// (MAXR CHUNK W floats), a chunk's outputs of all the blocks go there first, then to the output a row at a time past
// the caches: with 8-lane vectors a block's store is half a cache line, whose other half the next block stores
// hundreds of cycles later, and such half-line non-temporal stores stalled on the write-combining buffers (~10% of
// the weighted sums' samples on a Zen 1; staged, k = 7's forward took 2.5% less time, session 17).
// S: R kh kw vectors per block (block i0 + j's row r at (j R + r) kh kw VL); inv: R per block.
template <int R>
void blocks_forward(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Columns& cols, int64_t i0,
                    int64_t i1, int64_t dch, float* S, vf* inv, Trickle* tr, WrapRing& ring, float* stage) {
    auto rows_of = [&](int64_t i, float** Si) {
        for (int r = 0; r < R; ++r) Si[r] = S + ((i - i0) * R + r) * g.kh * g.kw * VL;
    };
    const std::vector<Lanes>& blocks = cols.blocks;
    const Plane qp = X.q.plane(bh), kp = X.k.plane(bh), vp = X.v.plane(bh);
    if (!cols.wrapped.empty()) ring.fill(g, X, bh, band, cols, i0, i1);
    for (int64_t c0 = 0; c0 < g.D; c0 += dch) {
        const int64_t C = std::min<int64_t>(dch, g.D - c0);
        for (int64_t i = i0; i < i1; ++i) {
            float* Si[R];
            rows_of(i, Si);
            if (const int w = blocks[i].wrap; w >= 0)
                block_dots<R, true>(g, qp, ring.plane(g, w, false), ring.local, cols.wrapped[w].view, Si, tr, c0, C,
                                    c0 > 0);
            else if (blocks[i].uniform) block_dots<R, true>(g, qp, kp, band, blocks[i], Si, tr, c0, C, c0 > 0);
            else block_dots<R, false>(g, qp, kp, band, blocks[i], Si, tr, c0, C, c0 > 0);
        }
    }
    for (int64_t i = i0; i < i1; ++i) {
        float* Si[R];
        rows_of(i, Si);
        block_softmax<R>(g, X, bh, band, blocks[i], Si, inv + (i - i0) * R);
    }
    const auto op = X.o.plane(bh);
    chunks(g.Dv, [&](auto nc, int64_t c0) {
        constexpr int NC = decltype(nc)::value;
        for (int64_t i = i0; i < i1; ++i) {
            const Lanes& L = blocks[i];
            float* Si[R];
            rows_of(i, Si);
            const vf* in = inv + (i - i0) * R;
            auto emit = [&](int r, int64_t c, vf acc) {
                if (stage) store(stage + (r * NC + c - c0) * g.W + L.c0, acc * in[r]);
                else store_output(g, op, band, L, r, c, acc, in[r]);
            };
            if (const int w = L.wrap; w >= 0)
                weighted_rows<R, true, NC>(g, c0, Si, ring.plane(g, w, true), ring.local, cols.wrapped[w].view, emit);
            else if (L.uniform) weighted_rows<R, true, NC>(g, c0, Si, vp, band, L, emit);
            else weighted_rows<R, false, NC>(g, c0, Si, vp, band, L, emit);
        }
        if (!stage) return;
        const int64_t x0 = blocks[i0].c0, x1 = blocks[i1 - 1].c0 + VL;
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < NC; ++c) {
                const float* from = stage + (r * NC + c) * g.W;
                float* to = op.at(c0 + c, band.r[r]);
                for (int64_t x = x0; x < x1; x += VL) {
                    const int64_t at = std::min(x, x1 - VL);  // the last block's columns when VL does not divide W
                    stream_store(to + at, load(from + at));
                }
            }
    });
}

// What the backward keeps per query row of a band: p and dS of the current block (kh kw vectors), and for the
// whole row those of the gathered queries (row buffers) and of the border queries (by window row, for border_add).
struct RowWork {
    std::vector<float> P, dS;
    RowBuffer Prow, dSrow;
    std::vector<float> Pb, dSb;
    RowWork(const Geo& g, const Columns& cols)
        : P(g.kh * g.kw * VL), dS(P.size()), Prow(g, g.kh * g.kw), dSrow(g, g.kh * g.kw),
          Pb(cols.border.size() * g.kh * round_up(g.kw), 0.0f), dSb(Pb.size(), 0.0f) {}
};

// Backward of one column block of the band's R query rows: dq; p and dS into each row's RowWork.
template <int R, bool U>
void block_backward(const Geo& g, const Operands& X, int64_t bh, const Band& band, const Lanes& L, RowWork* w) {
    const int64_t c0 = L.c0, n = g.kh * g.kw;
    const float log2_scale = g.scale * LOG2E;  // p = 2^(log2_scale s - lse log2 e)
    const auto qp = X.q.plane(bh), kp = X.k.plane(bh), vp = X.v.plane(bh), dop = X.dout.plane(bh),
               outp = X.out.plane(bh);
    const float *xq[R], *xdo[R];
    float *P[R], *dS[R];
    for (int i = 0; i < R; ++i) {
        xq[i] = qp.at(0, band.r[i]) + c0;
        xdo[i] = dop.at(0, band.r[i]) + c0;
        P[i] = w[i].P.data();
        dS[i] = w[i].dS.data();
    }
    dots<R, U>(g, g.D, xq, X.q.sc, kp, band, L, P, nullptr);
    dots<R, U>(g, g.Dv, xdo, X.dout.sc, vp, band, L, dS, nullptr);  // dp = dO v^T
    for (int i = 0; i < R; ++i) {
        const int64_t r = band.r[i];
        const vf lse = load(X.lse_saved + (bh * g.H + r) * g.W + c0) * LOG2E;  // in log2 units
        vf delta = splat(0.0f);  // rowsum(dO * O)
        for (int64_t c = 0; c < g.Dv; ++c) delta += load(dop.at(c, r) + c0) * load(outp.at(c, r) + c0);
        for (int64_t j = 0; j < n; ++j) {  // p = exp(scale s - lse), dS = p (dp - delta); 0 on lanes another block owns
            const vf p = L.active ? vexp2(load(P[i] + j * VL) * log2_scale - lse) : splat(0.0f);
            const vf ds = p * (load(dS[i] + j * VL) - delta);
            store(P[i] + j * VL, p);
            store(dS[i] + j * VL, ds);
            float* pr = w[i].Prow.row(j) + c0;
            float* dr = w[i].dSrow.row(j) + c0;
            store(pr, L.gathered ? p : load(pr));
            store(dr, L.gathered ? ds : load(dr));
        }
        const int64_t kwp = round_up(g.kw);
        for (const auto& [lane, idx] : L.border)  // border queries by window row
            for (int64_t a = 0; a < g.kh; ++a)
                for (int64_t b = 0; b < g.kw; ++b) {
                    w[i].Pb[(idx * g.kh + a) * kwp + b] = P[i][(a * g.kw + b) * VL + lane];
                    w[i].dSb[(idx * g.kh + a) * kwp + b] = dS[i][(a * g.kw + b) * VL + lane];
                }
    }
    const float* ds[R];
    for (int i = 0; i < R; ++i) ds[i] = dS[i];
    const auto dqp = X.dq.plane(bh);
    weighted<R, U>(g, g.D, ds, kp, band, L, [&](int i, int64_t c, vf acc) {  // dq
        float* dq = dqp.at(c, band.r[i]) + c0;
        store(dq, L.active ? acc * g.scale : load(dq));
    });
}

// A query row's channels [0, C) of x, times s, into a row buffer (its padding stays zero).
void copy_row(const Planes<const float>& x, int64_t bh, int64_t r, int64_t C, float s, const Geo& g, RowBuffer& out) {
    const auto xp = x.plane(bh);
    for (int64_t c = 0; c < C; ++c) {
        const float* src = xp.at(c, r);
        float* dst = out.row(c);
        for (int64_t i = 0; i < g.W; ++i) dst[i] = src[i] * s;
    }
}

// The bands of both directions, (first row, rows): rows r and r + dh (same dilation group) paired where their
// windows start at most one key row apart.
std::vector<std::pair<int64_t, int>> row_bands(const Geo& g) {
    std::vector<std::pair<int64_t, int>> bands;
    std::vector<bool> done(g.H, false);
    for (int64_t r0 = 0; r0 < g.H; ++r0) {
        if (done[r0]) continue;
        int R = 1;
        while (R < MAXR && r0 + R * g.dh < g.H) {  // the next row of the group starts 0 or 1 key row later
            const int64_t step = g.rs[r0 + R * g.dh] - g.rs[r0 + (R - 1) * g.dh];
            if (step != 0 && step != g.dh) break;
            ++R;
        }
        for (int i = 0; i < R; ++i) done[r0 + i * g.dh] = true;
        bands.push_back({r0, R});
    }
    return bands;
}

// Whether the trickle pays: a band's key and value rows (the most any band reads) take at most 3/4 of this core's L2,
// leaving room for the next band's. (128 x 128 maps, 64 channels: at kernel 7, 576 KB of a 1 MB L2, the trickle
// gained 5-15%; at kernel 13, 960 KB, and 31 it lost 5-10%.)
bool trickle_fits(const Geo& g, const std::vector<std::pair<int64_t, int>>& bands) {
    int64_t nt = 0;
    Band band;
    for (const auto& [r0, R] : bands) make_band(g, R, r0, band), nt = std::max(nt, band.nt);
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 <= 0) l2 = 1 << 20;
    return nt * (g.D + g.Dv) * g.W * (int64_t)sizeof(float) * 4 <= 3 * (int64_t)l2;
}

// Sets tr to the next band's first-touch memory: its key rows of k and v that the current band (of plane bh) does
// not read, and its query rows; spread over `steps` steps.
void plan_trickle(const Geo& g, const Operands& X, int64_t bh, const Band& cur, int64_t next_bh, const Band& next,
                  int R, int64_t steps, Trickle& tr) {
    tr.clear();
    const auto kp = X.k.plane(next_bh), vp = X.v.plane(next_bh), qp = X.q.plane(next_bh);
    for (int64_t t = 0; t < next.nt; ++t) {
        const int64_t row = next.krow[t];
        if (next_bh == bh && std::find(cur.krow.begin(), cur.krow.end(), row) != cur.krow.end()) continue;
        for (int64_t c = 0; c < g.D; ++c) tr.add(kp.at(c, row), g.W);
        for (int64_t c = 0; c < g.Dv; ++c) tr.add(vp.at(c, row), g.W);
    }
    for (int i = 0; i < R; ++i)
        for (int64_t c = 0; c < g.D; ++c) tr.add(qp.at(c, next.r[i]), g.W);
    tr.per = std::max<int64_t>(1, (tr.lines() + steps - 1) / std::max<int64_t>(1, steps));
}

// Calls f(std::integral_constant<int, R>{}) for a band's run-time row count (1..MAXR).
template <class F>
inline void with_rows(int R, F&& f) {
    upto<MAXR>(R, f);
}

Geo geometry(const int64_t* sizes, const int32_t* rs, const int32_t* cs, float scale) {
    return Geo{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], sizes[8],
               rs, cs, scale, sizes[10] != 0};
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
// dw, heads, stream] (stream: 1 for operands larger than the caches: the forward then prefetches each next band's
// rows (Trickle) and stores its output past the caches).
int attnlab_na_supported(const int64_t* sizes, const int32_t* cs) {
    Columns cols;
    return column_blocks(geometry(sizes, nullptr, cs, 1.0f), cols) ? 1 : 0;
}

// ptrs q, k, v, o, lse with strides [batch, head, channel, row] each (lse: contiguous (B, heads, H, W), its strides
// unused); columns have unit stride.
// rs (H) and cs (W): each row's and column's window start. Returns 0, or -1 for a geometry it does not take.
int attnlab_na_forward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                       const int32_t* rs, const int32_t* cs, int threads) {
    const Geo g = geometry(sizes, rs, cs, scale);
    Columns cols;
    if (!column_blocks(g, cols)) return -1;
    const std::vector<Lanes>& blocks = cols.blocks;
    Operands X = inputs(ptrs, strides, sizes);
    X.o = planes<float>(ptrs, strides, 3, sizes);
    X.lse = static_cast<float*>(ptrs[4]);
    // Work items: (bh, band, part of the row's blocks); a 1-D input (one row) is split along the row.
    const std::vector<std::pair<int64_t, int>> bands = row_bands(g);
    const int64_t nb = (int64_t)blocks.size(), nbands = (int64_t)bands.size();
    const int64_t items = std::max<int64_t>(1, g.BH * nbands);
    const int64_t parts = std::min<int64_t>(nb, std::max<int64_t>(1, 4 * threads / items));
    const bool trickle = g.stream && parts == 1 && trickle_fits(g, bands);
    const bool band_order = NA_BAND && g.H > 1;
    parallel(g.BH * nbands * parts, threads, [&](int64_t begin, int64_t end) {
        const int64_t group = band_order ? nb : 1;  // blocks per blocks_forward call
        std::vector<vf> Sv(group * MAXR * g.kh * g.kw);  // vector-aligned (softmax_lanes)
        float* const S = reinterpret_cast<float*>(Sv.data());
        std::vector<vf> inv(group * MAXR);
        Band band, next;
        Trickle tr;
        WrapRing ring(g, cols);
        // staged output stores (see blocks_forward): streaming, a band's blocks at a time, stores of part of a line
        std::vector<float> stage(g.stream && group > 1 && 4 * VL < 64 ? MAXR * CHUNK * g.W : 0);
        for (int64_t it = begin; it < end; ++it) {
            const int64_t part = it % parts, k = it / parts % nbands, bh = it / parts / nbands;
            const int R = bands[k].second;
            make_band(g, R, bands[k].first, band);
            const bool ahead = trickle && it + 1 < end;  // (parts == 1: the next item is the next band)
            if (ahead) {
                const int64_t k2 = (it + 1) % nbands;
                make_band(g, bands[k2].second, bands[k2].first, next);
                plan_trickle(g, X, bh, band, (it + 1) / nbands, next, bands[k2].second, nb * band.nt * g.D, tr);
            }
            const int64_t i0 = nb * part / parts, i1 = nb * (part + 1) / parts;
            for (int64_t i = i0; i < i1; i += group)
                with_rows(R, [&](auto rows) {
                    blocks_forward<decltype(rows)::value>(g, X, bh, band, cols, i, std::min(i1, i + group),
                                                          band_order ? NA_DCH : g.D, S, inv.data(),
                                                          ahead ? &tr : nullptr, ring,
                                                          stage.empty() ? nullptr : stage.data());
                });
        }
        if (g.stream) stream_fence();  // the output's non-temporal stores, before the caller reads it
    });
    return 0;
}

// ptrs q, k, v, o, lse, dout, dq, dk, dv (strides as the forward); dk and dv are added into (the caller zeroes
// them), dq is written. One thread per (batch, head) plane; per band of rows, its blocks, then its keys.
int attnlab_na_backward(const int64_t* sizes, const int64_t* strides, void* const* ptrs, float scale,
                        const int32_t* rs, const int32_t* cs, int threads) {
    const Geo g = geometry(sizes, rs, cs, scale);
    Columns cols;
    if (!column_blocks(g, cols)) return -1;
    Operands X = inputs(ptrs, strides, sizes);
    X.out = planes<const float>(ptrs, strides, 3, sizes);
    X.lse_saved = static_cast<const float*>(ptrs[4]);
    X.dout = planes<const float>(ptrs, strides, 5, sizes);
    X.dq = planes<float>(ptrs, strides, 6, sizes);
    X.dk = planes<float>(ptrs, strides, 7, sizes);
    X.dv = planes<float>(ptrs, strides, 8, sizes);
    const std::vector<std::pair<int64_t, int>> bands = row_bands(g);
    parallel(g.BH, threads, [&](int64_t begin, int64_t end) {
        std::vector<RowWork> w(MAXR, RowWork(g, cols));
        RowBuffer xrow(g, std::max(g.D, g.Dv));
        Band band;
        for (int64_t bh = begin; bh < end; ++bh)
            for (const auto& [r0, R] : bands) {
                make_band(g, R, r0, band);
                for (const Lanes& L : cols.blocks) {
                    with_rows(R, [&](auto rows) {
                        constexpr int NR = decltype(rows)::value;
                        auto run = L.uniform ? block_backward<NR, true> : block_backward<NR, false>;
                        run(g, X, bh, band, L, w.data());
                    });
                }
                for (int i = 0; i < R; ++i) {  // each row's keys: dv += p^T dO, dk += scale dS^T q
                    const int64_t r = band.r[i], *krow = band.krow.data() + band.shift[i];
                    copy_row(X.dout, bh, r, g.Dv, 1.0f, g, xrow);
                    gather_add(g, g.Dv, w[i].Prow, xrow, X.dv, bh, krow, cols.blocks);
                    border_add(g, g.Dv, w[i].Pb.data(), X.dout, 1.0f, r, X.dv, bh, krow, cols);
                    copy_row(X.q, bh, r, g.D, g.scale, g, xrow);
                    gather_add(g, g.D, w[i].dSrow, xrow, X.dk, bh, krow, cols.blocks);
                    border_add(g, g.D, w[i].dSb.data(), X.q, g.scale, r, X.dk, bh, krow, cols);
                }
            }
    });
    return 0;
}

}  // extern "C"
