"""The per-rank memory and communication model (ptmpi.bench.model) against hand counts."""

from __future__ import annotations

import pytest

from ptmpi.bench.model import GIB, evaluate, format_model, layout_cost, scan_grid
from ptmpi.cli import main
from ptmpi.memory import predict_arrays

SHAPE = (64, 64, 64)
V64 = 64**3 * 8  # one complex64 64^3 volume, bytes


def test_scan_grid_covers_the_projection():
    assert scan_grid(SHAPE, 32, 16) == ([0, 16, 32], 3)
    assert scan_grid(SHAPE, 16, 16) == ([0, 16, 32, 48], 4)
    assert scan_grid((1024,) * 3, 256, 128)[1] == 7
    assert scan_grid((2048,) * 3, 256, 128)[1] == 15


def test_replicated_layout_memory_is_predict_arrays_apt():
    # 12 angles on 4 ranks: 3 per rank, 9 frames each (3 x 3 windows of 32 at step 16)
    c = layout_cost(SHAPE, 12, 32, ranks=4, slabs=1, step=16)
    assert c["angles_local"] == 3 and c["frames_local"] == 27
    pred = predict_arrays(SHAPE, 27, 32, 3, "apt", compiled=True)
    assert c["memory"]["solver"] == pred["solver"]
    assert c["memory"]["projector"] == pred["projector"]
    # by hand: max(15.7 V + 5.0 Fb, 12.9 V + 7.0 Fb), Fb = 27 * 32^2 * 8
    assert c["memory"]["solver"] == int(15.7 * V64 + 5.0 * 27 * 1024 * 8)
    assert c["memory"]["projector"] == int(78 * 2.2 * 3 * 64 * 64)
    assert c["memory"]["halo"] == 0


def test_replicated_layout_communication():
    c = layout_cost(SHAPE, 12, 32, ranks=4, slabs=1, step=16, cg_iterations=8)
    # 9 normal-operator sums + 1 rhs, complex128 volume, 2 (p-1)/p of it each
    assert c["comm"]["allreduce"] == pytest.approx(10 * 2 * 3 / 4 * 16 * 64**3)
    assert c["comm"]["allreduce"] == pytest.approx(62914560)
    assert c["messages"]["allreduce"] == 10 * 2 * 2
    assert c["comm"]["volume_halo"] == 0
    assert c["comm"]["projection_halo"] == 0
    assert c["comm"]["scalars"] == 0
    # metrics (32 B) and stop flag (8 B) by recursive doubling over 4 ranks
    assert c["comm"]["metrics"] == 2 * 40
    assert c["messages"]["total"] == 40 + 4


def test_slab_volume_terms_scale_as_one_over_s_and_projector_with_angles():
    # windows of 16 at step 16: tops 0, 16, 32, 48; four slabs of 16 own one top each, so
    # the frames per rank are the same (32) for S = 1 (A = 8) and S = 4 (A = 2)
    one = layout_cost(SHAPE, 16, 16, ranks=8, slabs=1, step=16)
    four = layout_cost(SHAPE, 16, 16, ranks=8, slabs=4, step=16)
    assert one["frames_local"] == four["frames_local"] == 32
    assert four["slab_slices"] == 16
    assert one["memory"]["solver"] - four["memory"]["solver"] == pytest.approx(
        15.7 * V64 * 3 / 4, abs=1)
    assert four["memory"]["projector"] == pytest.approx(4 * one["memory"]["projector"], abs=4)
    assert four["halo_rows"] == 0  # the windows end where the slabs do
    assert four["comm"]["projection_halo"] == 0


def test_slab_layout_halos_allreduce_and_messages_by_hand():
    # windows of 32 at step 16: tops 0, 16, 32; slabs 0-2 each reach 16 rows into the next
    c = layout_cost(SHAPE, 16, 32, ranks=8, slabs=4, step=16, cg_iterations=8)
    assert c["angle_groups"] == 2 and c["angles_local"] == 8
    assert c["frames_local"] == 1 * 3 * 8
    assert c["halo_rows"] == 16
    # forward + adjoint: 2 x 8 angles x 16 rows x 64 columns x 8 B
    assert c["comm"]["projection_halo"] == 131072
    # (9 Laplacians + divergence + gradient) x 2 neighbours x 64^2 x 8 B
    assert c["comm"]["volume_halo"] == 11 * 2 * 4096 * 8 == 720896
    # slab-size complex128 sums among A = 2 ranks: 10 x 2 (1/2) x 16 x 16 x 64^2
    assert c["comm"]["allreduce"] == pytest.approx(10485760)
    # 18 dot products and 2 three-float vectors among S = 4 slabs
    assert c["comm"]["scalars"] == 18 * 2 * 8 + 2 * 2 * 24
    assert c["messages"] == {"allreduce": 20, "metrics": 6, "volume_halo": 22,
                             "projection_halo": 2, "scalars": 40, "total": 90}
    assert c["memory"]["halo"] == (2 * 4096 + 8 * 16 * 64) * 8


def test_no_allreduce_when_every_rank_owns_its_slab_and_thin_slabs_span_neighbours():
    c = layout_cost(SHAPE, 16, 32, ranks=8, slabs=8, step=16)
    assert c["angle_groups"] == 1
    assert c["comm"]["allreduce"] == 0 and c["messages"]["allreduce"] == 0
    # slab 0 (8 slices) owns the window at 0, which reaches row 32: 24 rows from 3 slabs
    assert c["halo_rows"] == 24
    assert c["messages"]["projection_halo"] == 2 * 3
    assert c["frames_local"] == 3 * 16


def test_layout_cost_refuses_impossible_layouts():
    with pytest.raises(ValueError):
        layout_cost(SHAPE, 16, 32, ranks=8, slabs=3)
    with pytest.raises(ValueError):
        layout_cost(SHAPE, 4, 32, ranks=8, slabs=1)  # more angle groups than angles
    with pytest.raises(ValueError):
        layout_cost((4, 64, 64), 16, 32, ranks=8, slabs=8)  # more slabs than slices


def test_evaluate_the_issue_geometries():
    rows = evaluate()
    assert [r["ranks"] for r in rows if r["n"] == 1024] == [64, 128, 256, 512, 1024, 2048,
                                                            4096]
    r = next(r for r in rows if r["n"] == 1024 and r["ranks"] == 64)
    # replicated 1024^3: the volume phase alone is 15.7 x 8 GiB
    assert r["s1"]["memory"]["solver"] > 15.7 * 8 * GIB
    assert r["s1"]["frames_per_angle"] == 49
    assert r["best"]["memory"]["total"] <= 80 * GIB and r["best"]["slabs"] > 1
    # no S = 1 layout with more ranks than angles
    assert next(r for r in rows if r["n"] == 2048 and r["ranks"] == 2048)["s1"] is None
    text = format_model(rows)
    assert "**1024^3**" in text and "**2048^3**" in text and "Crossover" in text


def test_cli_bench_model_prints_the_tables(capsys):
    assert main(["bench", "--model"]) == 0
    out = capsys.readouterr().out
    assert out.count("| ranks |") == 4  # two sizes x two memory limits
