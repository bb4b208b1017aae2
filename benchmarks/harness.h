// What the C++ harnesses in benchmarks/ (tile_item.cpp, na_item.cpp, na_ab.cpp) share: the timer, buffers on
// cache lines, and neighbourhood window starts.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <new>
#include <vector>

// The median of `trials` means over `reps` calls of f.
template <class F>
double median_seconds(int trials, int reps, F f) {
    std::vector<double> t;
    for (int i = 0; i < trials; ++i) {
        auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; ++r) f();
        t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// A std::allocator on 64-byte boundaries, as PyTorch allocates (a std::vector's large buffer starts 16 bytes into a
// page: every row then straddles cache lines, and streaming runs took up to twice as long).
template <class T>
struct Aligned {
    using value_type = T;
    Aligned() = default;
    template <class U> Aligned(const Aligned<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const Aligned<U>&) const { return true; }
    template <class U> bool operator!=(const Aligned<U>&) const { return false; }
};

// Query i's window start among n positions for kernel k: the window keeps its size and shifts inward at borders.
inline int32_t window_start(int64_t i, int64_t n, int64_t k) {
    return (int32_t)std::min<int64_t>(std::max<int64_t>(i - k / 2, 0), n - k);
}
