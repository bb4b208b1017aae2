// The timer of the C++ harnesses in benchmarks/ (tile_item.cpp, na_item.cpp).
#pragma once

#include <algorithm>
#include <chrono>
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
