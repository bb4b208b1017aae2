// Vector helpers shared by the CPU kernels (tile_attention.cpp, neighborhood.cpp): GCC vectors of one machine
// register each (16 floats with AVX-512, 8 with AVX2, 4 otherwise), loads and stores, a vector exp, horizontal max
// and sum, and the thread split. Header-only; every function is inline or in an anonymous namespace of the including
// file.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Floats per vector and vector registers: the kernels' register blocks (accumulators per loop) are sized from REGS.
// A vector wider than the registers (16 floats on AVX2, as before session 12) is split by the compiler into pairs
// whose blocks spill: on a Zen 3, neighborhood.cpp then took 440 s to compile and missed every speed target.
#if defined(__AVX512F__)
constexpr int VL = 16, REGS = 32;
#elif defined(__AVX__)
constexpr int VL = 8, REGS = 16;
#elif defined(__aarch64__)
constexpr int VL = 4, REGS = 32;
#else
constexpr int VL = 4, REGS = 16;
#endif
// A permute of lanes from two vectors (__builtin_shuffle(a, b, index)) is one instruction (vpermt2ps).
#if defined(__AVX512F__)
constexpr bool TWO_VECTOR_PERMUTE = true;
#else
constexpr bool TWO_VECTOR_PERMUTE = false;
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));

// Unaligned loads and stores typed as float vectors, not memcpy: a memcpy store may alias any object, so after each
// one GCC reloaded every pointer and size a loop had read through a reference (the neighbourhood forward's output
// stores recomputed their addresses from the captured plane and band, ~15% of its weighted sums in cache on a Zen 1,
// session 15); a float-vector store aliases floats only.
typedef float vf_unaligned __attribute__((vector_size(4 * VL), aligned(4)));
inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
// A store to a vector-aligned p: one instruction where GCC's tuning for a Zen 1 splits an unaligned 256-bit store
// into two halves.
inline void store_aligned(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
// x in every lane: lane 0 of {x} shuffled everywhere, one broadcast (vf{} + x adds 0.0 first, and a loop over the
// lanes became a chain of inserts inside the AVX2 build's register blocks).
inline vf splat(float x) { return __builtin_shuffle(vf{x}, vi{}); }
// {0, 1, ..., VL - 1}
template <size_t... I>
constexpr vi lanes(std::index_sequence<I...>) { return vi{int32_t(I)...}; }
constexpr vi lanes() { return lanes(std::make_index_sequence<VL>{}); }
inline int64_t round_up(int64_t n) { return (n + VL - 1) / VL * VL; }
constexpr float LOG2E = 1.44269504088896341f;

// max(t, lo) in every lane, NaN staying NaN: one instruction on x86 (its max returns the second operand when either
// is NaN), a compare and a blend elsewhere.
inline vf at_least(vf t, float lo) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)t);
#elif defined(__AVX__)
    return (vf)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)t);
#else
    return t < lo ? splat(lo) : t;
#endif
}

// 2^t for a vector of t <= 0 (the softmaxes' exponent in log2 units: the logits' scale times log2 e folds into the
// FMA that forms t): 2^n 2^f with n = round(t), |f| <= 1/2, 2^f by a degree-5 polynomial fitted to it on the
// relative error (at most 1.6e-7 in fp32, measured over [-126, 0]). 2^t below the smallest normal float (t < -126),
// -inf included, gives 0 under the kernels' flushed subnormals (FlushSubnormals), as exp does there: the tile
// kernel's masked logits rely on it. t is first raised to at least -127, whose 2^n has a zero exponent field (the
// product is exactly 0); for n = -126 and f < 0 the product is subnormal, flushed to 0. The bias 127 is in the
// rounding constant, so r's low mantissa bits are n + 127, the exponent field of 2^n, after one shift. 11 operations
// where the natural-base exp with a split ln 2 took 19, and session 17's 13 (a compare and a blend for the floor, an
// integer add of the bias): on a Zen 1, whose softmax loops are bound by their operation count, a block's softmax
// took 5-9% less time per vector (session 18).
inline vf vexp2(vf t) {
    t = at_least(t, -127.0f);  // NaN stays NaN
    const vf magic = splat(12583039.0f);  // 1.5 * 2^23 + 127: r's low mantissa bits are round(t) + 127
    const vf r = t + magic, f = t - (r - magic);
    vf p = splat(1.321867730e-03f);
    p = p * f + 9.671707225e-03f;
    p = p * f + 5.550893057e-02f;
    p = p * f + 2.402223786e-01f;
    p = p * f + 6.931468558e-01f;
    p = p * f + 1.0f;
    vi e;
    std::memcpy(&e, &r, sizeof e);
    e = e << 23;  // 2^round(t): r's bits above the mantissa's low 9 shift out, round(t) + 127 lands in the exponent
    vf scale;
    std::memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

// log(x) for a vector of positive normal floats: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(t),
// t = (m - 1) / (m + 1), |t| < 0.172, by its odd series to t^9 (relative error below 1e-7).
inline vf vlog(vf x) {
    vi bits;
    std::memcpy(&bits, &x, sizeof bits);
    vi e = ((bits >> 23) & 0xff) - 127;
    vi mb = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
    vf m;
    std::memcpy(&m, &mb, sizeof m);
    const vi big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e = big ? e + 1 : e;
    const vf t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
    vf p = splat(1.0f / 9);
    p = p * t2 + 1.0f / 7;
    p = p * t2 + 1.0f / 5;
    p = p * t2 + 1.0f / 3;
    p = p * t2 + 1.0f;
    return 2.0f * t * p + __builtin_convertvector(e, vf) * 0.693147180559945309f;
}

// Prefetch the cache lines that hold [p, p + n) (LOCALITY 3: into L1, 2: into L2).
template <int WRITE = 0, int LOCALITY = 3>
inline void prefetch_span(const float* p, int64_t n) {
    const uintptr_t last = reinterpret_cast<uintptr_t>(p + n - 1);
    for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a <= last; a += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(a), WRITE, LOCALITY);
}

// Horizontal max and sum by halving (log2 VL shuffles instead of VL element extractions): step s combines lane i
// with lane i ^ s.
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vadd(vf a, vf b) { return a + b; }
template <class Op>
inline float halve(vf v, Op op) {
    for (int s = VL / 2; s > 0; s /= 2) v = op(v, __builtin_shuffle(v, lanes() ^ s));
    return v[0];
}
inline float hmax(vf v) { return halve(v, vmax); }
inline float hsum(vf v) { return halve(v, vadd); }

// f(std::integral_constant<int, n>{}) for a run-time n in 1..N (nothing for other n): register-blocked loops
// instantiate one body per block size and dispatch their remainders here.
template <int N, class F>
inline void upto(int64_t n, F&& f) {
    if constexpr (N > 0) {
        if (n == N) return f(std::integral_constant<int, N>{});
        upto<N - 1>(n, f);
    }
}

// x, held in a register: stops the compiler from folding a load that several FMAs share into each of them (which
// loads the same vector once per FMA where loads, not FMAs, bound a loop). A no-op where the asm constraint for
// vector registers is not known.
inline vf in_register(vf x) {
#if defined(__AVX512F__)
    asm("" : "+v"(x));
#elif defined(__x86_64__) || defined(__i386__)
    asm("" : "+x"(x));
#endif
    return x;
}

// Lanes S..VL-1 of lo, then lanes 0..S-1 of hi: VL consecutive floats of the 2 VL that lo and hi hold (one `valignd`
// with AVX-512: the shift must be an immediate, a shift index in a register measured no faster than unaligned loads).
template <int S>
inline vf shifted(vf lo, vf hi) {
    static_assert(S > 0 && S < VL, "shifted: 0 < S < VL");
#ifdef __AVX512F__  // the masked form: GCC 12 warns about the unmasked intrinsic's undefined source operand
    return _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(0xffff, _mm512_castps_si512(hi), _mm512_castps_si512(lo), S));
#else
    return __builtin_shuffle(lo, hi, lanes() + S);
#endif
}

// A store past the caches (non-temporal) where p is on a cache line and the target has one, else a plain store: for
// results that are not read again soon, it saves reading the line in before writing it (both kernels' large
// outputs). Callers end with stream_fence() before other threads may read the results.
#if defined(__AVX512F__) || defined(__AVX__)
constexpr uintptr_t STREAM_ALIGN = 4 * VL;  // the address alignment a non-temporal vector store needs
#else
constexpr uintptr_t STREAM_ALIGN = 0;  // none on this target: stream_store stores plainly
#endif
inline bool stream_aligned(const float* p) {
    return STREAM_ALIGN > 0 && (reinterpret_cast<uintptr_t>(p) & (STREAM_ALIGN - 1)) == 0;
}
inline void stream_store(float* p, vf v) {
#if defined(__AVX512F__)
    if (stream_aligned(p)) return _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
    if (stream_aligned(p)) return _mm256_stream_ps(p, (__m256)v);
#endif
    store(p, v);
}
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#endif
}

// Subnormal floats flushed to zero (inputs and results) while alive, in this thread: an FMA on a subnormal takes a
// microcode assist of ~100 cycles, and a softmax computed elsewhere (channel attention's, by PyTorch) is full of
// them (exp(-100) = 4e-44). Nothing an attention output shows is below 1.2e-38.
struct FlushSubnormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned before = _mm_getcsr();
    FlushSubnormals() { _mm_setcsr(before | 0x8040); }  // FTZ (bit 15) and DAZ (bit 6)
    ~FlushSubnormals() { _mm_setcsr(before); }
#endif
};

// fn(begin, end) over [0, items) split evenly across up to `threads` threads. With OpenMP (the library is built
// with -fopenmp) the threads are the OpenMP pool's -- PyTorch's own, since the process has one libgomp: after a
// PyTorch op its idle workers spin for a while before they sleep, and threads of our own would share the cores
// with them (a 10 ms kernel right after a softmax took 15-16 ms). Without OpenMP, std::threads.
template <class F>
void parallel(int64_t items, int threads, F fn) {
    threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, items));
    if (threads == 1) {
        FlushSubnormals flush;
        fn(0, items);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        FlushSubnormals flush;
        const int64_t i = omp_get_thread_num(), n = omp_get_num_threads();
        fn(items * i / n, items * (i + 1) / n);
    }
#else
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i) {
        const int64_t a = items * i / threads, b = items * (i + 1) / threads;
        pool.emplace_back([=] { FlushSubnormals flush; fn(a, b); });
    }
    for (auto& th : pool) th.join();
#endif
}

}  // namespace
