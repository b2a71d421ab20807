"""The default TV weight from the data (:mod:`ptmpi.solvers.regularisation`)."""

from __future__ import annotations

import math

import pytest

from ptmpi.solvers.admm import SolverSettings, resolve
from ptmpi.solvers.regularisation import default_tv_weight


def test_rule_values():
    # noise-free: proportional to L
    weight, reason = default_tv_weight(5e-6, 0.024, 8083.0, 0.0)
    assert weight == pytest.approx(5e-6 * 8083) and "noise-free" in reason
    # photon counts: + 0.024 * 0.5 * sqrt(L); the three calibration doses (48x48x32)
    for norm, expected in ((60.62, 0.0937), (606.2, 0.2985), (8083.0, 1.119)):
        weight, reason = default_tv_weight(5e-6, 0.024, norm, 0.5)
        assert weight == pytest.approx(expected, rel=2e-3)
        assert "sqrt(L)" in reason and f"{norm:.4g}" in reason
    # a 100x dose (L x 100) raises the noise term 10x
    low = default_tv_weight(0.0, 0.024, 50.0, 0.5)[0]
    assert default_tv_weight(0.0, 0.024, 5000.0, 0.5)[0] == pytest.approx(10 * low)


def test_resolve_stores_the_rule():
    params = resolve(SolverSettings(), 519.3, 0.5)
    assert params["tv_weight"] == pytest.approx(5e-6 * 519.3 + 0.012 * math.sqrt(519.3))
    assert params["tv_weight_rule"].startswith("photon counts")
    assert params["r1"] == pytest.approx(params["tv_weight"] / 0.05)
    given = resolve(SolverSettings(tv_weight=0.1), 519.3, 0.5)
    assert given["tv_weight"] == 0.1 and given["tv_weight_rule"] == "given (--tv-weight)"
    assert resolve(SolverSettings(algorithm="apts"), 519.3, 0.5)["tv_weight"] == 0
