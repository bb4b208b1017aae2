"""Memory growth exponents: the whole-range fit, the fit without the smallest size, and the local slopes."""

import math

import pytest

from attnlab.bench.memory import growth_details


def test_growth_details_of_a_power_law_with_a_constant_offset():
    ns = [1024, 2048, 4096, 8192, 16384]
    pts = [(n, 50.0 + 1e-6 * n**2) for n in ns]  # fixed cost first, quadratic later: slopes must steepen
    g = growth_details(pts)
    assert g["tail_n_range"] == [2048, 16384]
    local = g["local_exponents"]
    assert len(local) == 4 and all(b > a for a, b in zip(local, local[1:]))
    assert local[-1] == pytest.approx(math.log2(pts[-1][1] / pts[-2][1]))
    assert local[0] < g["tail_exponent"] < local[-1]


def test_growth_details_with_few_sizes_has_no_tail():
    g = growth_details([(1024, 10.0), (4096, 40.0)])
    assert "tail_exponent" not in g and g["local_exponents"] == [pytest.approx(1.0)]
