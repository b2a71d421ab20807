"""The projector against ASTRA's CPU projector with many angles, on one rank.

``python -m ptmpi.bench.projector_astra [N NZ ANGLES RUNS]`` (defaults 128 16 180 5)
(needs the ``bench`` extra, astra-toolbox). Times ``Projector.fwd`` and ``adj`` on ``nz``
complex slices of ``n x n`` (a complex slice counts as two real slices) and ASTRA's
``strip`` (the same voxel-area model), ``linear`` and ``line`` forward projections of one
real slice, per slice and angle, alternately in each run; prints each run and the median
ratio. With 180 angles the projector's sparse weights no longer fit in cache, which the
12-angle cases of ``ptmpi bench`` do not show.
"""

from __future__ import annotations

import statistics
import sys

import numpy as np

from ptmpi.bench import time_astra
from ptmpi.bench.floors import median_time
from ptmpi.operators.tomo import Projector


def compare(n: int, nz: int, angles: int, runs: int, repeat: int = 5) -> list[dict]:
    """Per run: our forward and adjoint and ASTRA's kernels, seconds per real slice and
    angle."""
    theta = np.linspace(0, np.pi, angles, endpoint=False)
    rng = np.random.default_rng(0)
    u = (rng.random((nz, n, n)) + 1j * rng.random((nz, n, n))).astype(np.complex64)
    projector = Projector((nz, n, n), theta)
    p = projector.fwd(u)
    per = 2 * nz * angles
    rows = []
    for _ in range(runs):
        row = {"fwd": median_time(lambda: projector.fwd(u), repeat) / per,
               "adj": median_time(lambda: projector.adj(p), repeat) / per}
        astra = time_astra(n, angles, repeat)
        if astra is None:
            raise SystemExit("astra-toolbox is not installed (pip install -e '.[bench]')")
        row.update({f"astra_{k}": v for k, v in astra.items()})
        rows.append(row)
    return rows


def main(argv=None) -> None:
    values = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    n, nz, angles, runs = values + [128, 16, 180, 5][len(values):]
    rows = compare(n, nz, angles, runs)
    print(f"{nz} complex slices of {n}^2, {angles} angles, one process; "
          "us per real slice and angle")
    for row in rows:
        print(f"  ours fwd {row['fwd'] * 1e6:.2f}, adj {row['adj'] * 1e6:.2f}; ASTRA strip "
              f"{row['astra_strip'] * 1e6:.1f}, linear {row['astra_linear'] * 1e6:.1f}, "
              f"line {row['astra_line'] * 1e6:.1f}")
    for kind in ("strip", "linear", "line"):
        ratio = statistics.median(r[f"astra_{kind}"] / r["fwd"] for r in rows)
        print(f"ASTRA {kind} / ours (forward), median over runs: {ratio:.1f}x")


if __name__ == "__main__":
    main()
