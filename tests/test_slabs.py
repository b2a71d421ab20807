"""The angle x slab grid (``--slabs S``) against the serial computation.

One tiny case (volume 10 x 24 x 24, probe 8, 6 angles, Poisson counts, jittered scan):
10 slices over 4 slabs give uneven slabs of 3, 3, 2 and 2 slices, every one thinner than
the probe, so every window spans two or more slabs; 5 slices over 4 slabs give slabs of
a single slice for the halo tests. Serial tests: the pieces that must not depend on the
split (per-slice sums, the random start of the power iteration, the TV step on a slab
with its halo, the memory plan). Multi-rank tests: halos, transposes and the data term
against serial references; APT/APTs after 20 iterations with S = 1, 2, 4 (4 ranks) and
S = 3 (3 ranks) against one rank; a checkpoint written on one grid resumed on another.
Device path (strict stand-in for CuPy, ``strict_xp``; CuPy too where a GPU is usable): the
communicator's staging of device buffers, APT on the slab grid and ``reconstruct(...,
gpu=True, slabs=2)`` against the numpy runs.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptmpi.io.cxi import write_input
from ptmpi.operators import kernels
from ptmpi.operators.grad import Gradient
from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.parallel.data_term import DataTerm
from ptmpi.parallel.volume import SlabGradient, VolumeSpace, slice_vdot
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve
from ptmpi.solvers.prox import update_tv_split

NZ, N, M = 10, 24, 8
N_ANGLES = 6
SHAPE = (NZ, N, N)
VOLUME = "entry_1/image_1/data"


def tiny_data():
    return simulate(SimulationSettings(n=N, nz=NZ, n_angles=N_ANGLES, step=4, probe_size=M,
                                       fwhm=3.0, eta=50.0, seed=7, jitter=1.5))


def problem(data, a0: int, a1: int) -> LocalProblem:
    """Angles ``[a0, a1)`` of ``data`` (counts with zero frequency at the corner)."""
    off = data.frame_offset
    f0, f1 = int(off[a0]), int(off[a1])
    return LocalProblem(volume_shape=SHAPE, theta_local=np.deg2rad(data.angles_deg[a0:a1]),
                        f_local=np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)),
                        positions_local=data.positions_px[f0:f1],
                        frame_offset_local=off[a0:a1 + 1] - f0, probe=data.probe,
                        truth_volume=data.volume)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_volume(shape, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


# ---------------------------------------------------------------------------- serial


def test_slice_sums_do_not_depend_on_the_split():
    """vdot and norm summed per slice: equal to numpy's within rounding, and the sum of
    the slabs' per-slice partials (in slice order) equals the whole volume's bit for bit."""
    x, y = random_volume(SHAPE, 1), random_volume(SHAPE, 2)
    whole = VolumeSpace(SHAPE)
    value = whole.vdot(x, y)
    ref = np.vdot(x.astype(np.complex128), y.astype(np.complex128))
    assert abs(value - ref) <= 1e-12 * abs(ref)
    assert abs(whole.norm(x) - np.linalg.norm(x.astype(np.complex128))) <= 1e-12 * whole.norm(x)
    parts = np.concatenate([slice_vdot(x[z0:z1], y[z0:z1])
                            for z0, z1 in [(0, 3), (3, 6), (6, 8), (8, 10)]])
    assert np.array_equal(parts.sum(axis=0), whole.total(slice_vdot(x, y)))


def test_power_iteration_start_is_drawn_slab_by_slab():
    from ptmpi.parallel.slab_data_term import random_slab

    full = np.random.default_rng(0).standard_normal(SHAPE)
    for z0, z1 in [(0, 3), (3, 6), (6, 8), (8, 10), (9, 10)]:
        assert np.array_equal(random_slab(SHAPE, z0, z1), full[z0:z1])


@pytest.mark.skipif(not kernels.ENABLED, reason="compiled kernels not available")
def test_tv_step_on_a_slab_with_the_next_slice():
    """The fused TV split of a slab, given the next slab's first slice, is the serial
    step's slab bit for bit (p, lam1 and the per-slab statistics)."""
    u, lam1 = random_volume(SHAPE, 3), random_volume((3, *SHAPE), 4)
    stats = np.zeros(3)
    p = kernels.tv_step(u, lam1_all := lam1.copy(), 0.2, None, stats)
    sums = np.zeros(3)
    for z0, z1 in [(0, 3), (3, 6), (6, 8), (8, 10)]:
        lam_slab = np.ascontiguousarray(lam1[:, z0:z1])
        part = np.zeros(3)
        p_slab = kernels.tv_step(np.ascontiguousarray(u[z0:min(z1 + 1, NZ)]), lam_slab, 0.2,
                                 None, part)
        assert np.array_equal(p_slab, p[:, z0:z1])
        assert np.array_equal(lam_slab, lam1_all[:, z0:z1])
        sums += part
    assert np.allclose(sums, stats, rtol=1e-12)


def test_normal_diagonal_slab():
    grad = Gradient(SHAPE)
    whole = grad.normal_diagonal(np, np.float32)
    assert np.array_equal(grad.normal_diagonal_slab(np, np.float32, 3, 6), whole[3:6])


def test_slab_layout_memory_at_384_cubed():
    """The acceptance case's plan: 384^3, 12 angles (121 frames of 64^2 each) on 4 ranks,
    --slabs 4 against --slabs 1: at most 0.35 times the memory per rank."""
    from ptmpi.memory import predict_arrays

    shape, frames, m = (384, 384, 384), 3 * 121, 64
    replicated = predict_arrays(shape, frames, m, 3, "apt", truth=True)["total"]
    slabs = predict_arrays(shape, frames, m, 3, "apt", truth=True, slabs=4,
                           n_theta_group=12)
    assert slabs["transposes"] > 0
    assert slabs["total"] <= 0.35 * replicated


def test_slabs_more_than_slices_is_refused():
    from ptmpi.reconstruct import RunError, _choose_slabs

    with pytest.raises(RunError, match="only 4 slices"):
        _choose_slabs(8, None, {"shape": (4, 16, 16)}, "apt", np.complex64, SerialComm(), 1,
                      "linear", False)


# ---------------------------------------------------------------------------- multi-rank


def _grid(comm, slabs):
    from ptmpi.parallel.slab_data_term import SlabGrid

    return SlabGrid(comm, slabs)


@pytest.mark.mpi(ranks=[2, 4], timeout=120, unit="s")
@pytest.mark.parametrize("nz", [NZ, 5])
def test_halo_gradient_equals_serial(mpi_ranks, nz):
    """grad, -div, -Lap, a wide - b Lap, -div(a + b) and the TV split on slabs (5 slices
    over 4 ranks: one slice per slab but the first) equal the serial operators' slabs
    exactly."""
    comm = MPIComm()
    shape = (nz, N, N)
    for slabs in sorted({comm.size, 2}):
        grid = _grid(comm, slabs)
        vol = grid.volume(shape)
        u, g = random_volume(shape, 5), random_volume((3, *shape), 6)
        serial, sg = Gradient(shape), SlabGradient(vol)
        ul, gl = vol.local(u).copy(), np.ascontiguousarray(vol.local(g))
        assert np.array_equal(sg.fwd(ul), vol.local(serial.fwd(u)))
        assert np.array_equal(sg.adj(gl), vol.local(serial.adj(g)))
        assert np.array_equal(sg.normal(ul), vol.local(serial.normal(u)))
        wide = random_volume(shape, 7).astype(np.complex128)
        assert np.array_equal(sg.normal_plus(ul, np.ascontiguousarray(vol.local(wide)), 0.7, 0.2),
                              vol.local(serial.normal_plus(u, wide, 0.7, 0.2)))
        assert np.array_equal(sg.adj_sum(gl, 2 * gl), vol.local(serial.adj_sum(g, 2 * g)))
        assert np.array_equal(sg.normal_diagonal(np, np.float32),
                              vol.local(serial.normal_diagonal(np, np.float32)))
        lam, lam_l = g.copy(), gl.copy()
        stats, stats_l = np.zeros(3), np.zeros(3)
        p = update_tv_split(serial, u, lam, 0.3, None, stats)
        p_l = update_tv_split(sg, ul, lam_l, 0.3, None, stats_l)
        assert np.array_equal(p_l, vol.local(p)) and np.array_equal(lam_l, vol.local(lam))
        assert np.allclose(vol.sum(stats_l), stats, rtol=1e-12)


@pytest.mark.mpi(ranks=[3, 4], timeout=120, unit="s")
def test_transposes_and_data_term_equal_serial(mpi_ranks):
    """Slab rows -> owners' projections and back equal the serial projections; the slab
    data term's maps equal the serial DataTerm's slabs (the sums over angles within
    rounding of float64)."""
    from ptmpi.operators.tomo import Projector
    from ptmpi.parallel.slab_data_term import SlabDataTerm, to_owners, to_slabs

    comm = MPIComm()
    data = comm.bcast(tiny_data() if comm.is_root else None)
    u = random_volume(SHAPE, 7)
    theta = np.deg2rad(data.angles_deg)
    full_proj = Projector(SHAPE, theta).fwd(u)  # (N_ANGLES, nz, n)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    for slabs in sorted({comm.size, 1} | ({2} if comm.size % 2 == 0 else set())):
        grid = _grid(comm, slabs)
        vol = grid.volume(SHAPE)
        counts = grid.group.allgather(a1 - a0)
        g0 = block_partition(N_ANGLES, comm.size, comm.rank - grid.slab)[0]
        rows = np.ascontiguousarray(full_proj[g0:g0 + sum(counts), vol.z0:vol.z1])
        owned = to_owners(rows, grid.group, counts, vol.bounds)
        assert np.array_equal(owned, full_proj[a0:a1])
        assert np.array_equal(to_slabs(owned, grid.group, counts, vol.bounds), rows)
        if slabs == 1:
            continue
        p = problem(data, 0, N_ANGLES)
        serial = DataTerm(SHAPE, p.theta_local, data.probe.astype(np.complex64),
                          p.positions_local, p.frame_offset_local, SerialComm())
        mine = problem(data, a0, a1)
        dt = SlabDataTerm(grid, SHAPE, mine.theta_local, data.probe.astype(np.complex64),
                          mine.positions_local, mine.frame_offset_local)
        off = data.frame_offset
        z = serial.fwd(u)
        ul = vol.local(u).copy()
        assert np.array_equal(dt.fwd(ul), z[off[a0]:off[a1]])
        assert rel(dt.adj(z[off[a0]:off[a1]]), vol.local(serial.adj(z))) < 1e-14
        assert rel(dt.normal(ul), vol.local(serial.normal(u))) < 1e-14
        assert rel(dt.diagonal(), vol.local(serial.diagonal())) < 1e-14
        assert abs(dt.norm(5) - serial.norm(5)) <= 1e-6 * serial.norm(5)


@pytest.mark.mpi(ranks=[4], timeout=300, unit="s")
def test_apt_every_layout_equals_one_rank(mpi_ranks):
    """4 ranks, S = 1, 2, 4 (slabs of 5 and of 3, 3, 2, 2 slices, thinner than the 8-pixel
    probe): u after 20 APT iterations equals the one-rank u to 1e-5 (relative); APTs with
    probe refinement on S = 2 likewise."""
    comm = MPIComm()
    data = comm.bcast(tiny_data() if comm.is_root else None)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    cases = [(SolverSettings(iterations=20, tol=0), (1, 2, 4)),
             (SolverSettings(algorithm="apts", iterations=20, tol=0, refine_probe=True), (2,))]
    for settings, layouts in cases:
        ref = solve(problem(data, 0, N_ANGLES), settings, SerialComm())[0] if comm.is_root \
            else None
        for slabs in layouts:
            grid = _grid(comm, slabs)
            state, _ = solve(problem(data, a0, a1), settings, comm, layout=grid)
            u = grid.volume(SHAPE).gather(state.u) if slabs > 1 else state.u
            u = u if grid.group_index == 0 else None
            if comm.is_root:
                assert rel(u, ref.u) <= 1e-5, (settings.algorithm, slabs, rel(u, ref.u))
                assert state.history["snr_db"][-1] == pytest.approx(
                    ref.history["snr_db"][-1], rel=1e-6)
                assert state.history["r_factor"][-1] == pytest.approx(
                    ref.history["r_factor"][-1], rel=1e-6)
    comm.barrier()


@pytest.mark.mpi(ranks=[3], timeout=300, unit="s")
def test_apt_three_uneven_slabs_equals_one_rank(mpi_ranks):
    """3 ranks, S = 3: slabs of 4, 3 and 3 slices, angles 2 + 2 + 2 in one group; with the
    cap of the ``r2`` rule lifted, so that ``r2 = 20 d / L`` comes from the slabs' mean
    diagonal (large volumes)."""
    comm = MPIComm()
    data = comm.bcast(tiny_data() if comm.is_root else None)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    settings = SolverSettings(iterations=20, tol=0, r2_default_max=10.0,
                              r2_ray_factor=0.0)
    grid = _grid(comm, 3)
    state, params = solve(problem(data, a0, a1), settings, comm, layout=grid)
    u = grid.volume(SHAPE).gather(state.u)
    if comm.is_root:
        ref, ref_params = solve(problem(data, 0, N_ANGLES), settings, SerialComm())
        assert ref_params["r2"] != 0.1
        assert params["r2"] == pytest.approx(ref_params["r2"], rel=1e-6)
        assert rel(u, ref.u) <= 1e-5
    comm.barrier()


@pytest.mark.mpi(ranks=[4], timeout=300, unit="s")
def test_two_step_start_on_slabs_equals_one_rank(mpi_ranks):
    """``--start two-step`` on the slab grid (S = 2: two angle groups of two slabs; S = 4):
    the images transposed to slab rows, the tomography solved slab by slab; the start
    volume, its SNR and far fields, and APT after 10 iterations from it equal the one-rank
    run's."""
    from ptmpi.solvers.start import two_step_start

    comm = MPIComm()
    data = comm.bcast(tiny_data() if comm.is_root else None)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    off = data.frame_offset
    settings = SolverSettings(start="two-step", start_iterations=8, iterations=10, tol=0)
    ref_start, ref_info = two_step_start(problem(data, 0, N_ANGLES), settings, SerialComm())
    ref_z = ref_start.z_local[off[a0] - off[0]:off[a1] - off[0]].copy()
    ref_u0 = ref_start.u.copy()
    ref = solve(problem(data, 0, N_ANGLES), settings, SerialComm(), state=ref_start)[0]
    assert rel(ref_u0, np.ones(SHAPE)) > 1e-2
    for slabs in (2, 4):
        grid = _grid(comm, slabs)
        volume = grid.volume(SHAPE)
        start, info = two_step_start(problem(data, a0, a1), settings, comm, layout=grid)
        assert start.u.shape == volume.local_shape
        assert start.p.shape == (3, *volume.local_shape)
        u0 = volume.gather(start.u)
        assert info["start_snr_db"] == pytest.approx(ref_info["start_snr_db"], abs=1e-4)
        np.testing.assert_allclose(start.z_local, ref_z, rtol=0,
                                   atol=1e-5 * np.abs(ref_z).max())
        state, _ = solve(problem(data, a0, a1), settings, comm, state=start, layout=grid)
        u = volume.gather(state.u)
        if grid.group_index == 0 and comm.is_root:
            assert rel(u0, ref_u0) <= 1e-6, (slabs, rel(u0, ref_u0))
            assert rel(u, ref.u) <= 1e-5, (slabs, rel(u, ref.u))
    comm.barrier()


def _write_input(path, data):
    write_input(path, counts=data.counts, probe=data.probe, positions_px=data.positions_px,
                frame_offset=data.frame_offset, angles_deg=data.angles_deg,
                volume_shape=data.volume.shape, truth_volume=data.volume,
                truth_probe=data.probe)


@pytest.mark.mpi(ranks=[4], timeout=300, unit="s")
def test_checkpoint_resumes_on_another_grid(mpi_ranks, shared_tmp):
    """Written with S = 2 and resumed with S = 1, written with S = 1 and resumed with S = 4
    (4 ranks, checkpoint after 10 of 20 iterations): the output volume equals that of an
    uninterrupted one-rank run to 1e-5; the checkpoint holds the whole volume."""
    from ptmpi.io.checkpoint import read_checkpoint_header
    from ptmpi.reconstruct import reconstruct

    comm = MPIComm()
    path = shared_tmp / "tiny.h5"
    if comm.is_root:
        _write_input(path, tiny_data())
    comm.barrier()
    ten, twenty = SolverSettings(iterations=10, tol=0), SolverSettings(iterations=20, tol=0)

    def run(name, settings, slabs, **kwargs):
        reconstruct(str(path), str(shared_tmp / name), settings, comm, figures=False,
                    slabs=slabs, **kwargs)

    for first, second in [(2, 1), (1, 4)]:
        ck = shared_tmp / f"ck-{first}-{second}.h5"
        run("part.h5", ten, first, checkpoint=str(ck), checkpoint_every=10, force=True)
        if comm.is_root:
            assert read_checkpoint_header(ck).volume_shape == SHAPE
        run(f"resumed-{first}-{second}.h5", twenty, second, checkpoint=str(ck), resume=True)
    if comm.is_root:
        reconstruct(str(path), str(shared_tmp / "full.h5"), twenty, SerialComm(),
                    figures=False)
    comm.barrier()
    if comm.is_root:
        with h5py.File(shared_tmp / "full.h5") as f:
            ref = f[VOLUME][()]
        for first, second in [(2, 1), (1, 4)]:
            with h5py.File(shared_tmp / f"resumed-{first}-{second}.h5") as f:
                assert rel(f[VOLUME][()], ref) <= 1e-5, (first, second)


@pytest.mark.mpi(ranks=[4], timeout=120, unit="s")
def test_auto_chooses_node_slabs_then_the_fewest_that_fit(mpi_ranks, monkeypatch):
    """--slabs auto: on CPUs one slab per rank of the node (here 4 ranks on one node) when
    that plan fits; with --gpu 1 when the replicated plan fits, with less memory than that
    (but enough for two slabs) 2; with less than any plan needs, the smallest plan."""
    import ptmpi.memory
    from ptmpi.reconstruct import _choose_slabs, _plan_memory

    comm = MPIComm()
    assert comm.local_size == 4
    layout = {"shape": (256, 256, 256), "frame_offset": np.arange(0, 13 * 12, 12), "m": 16,
              "truth": True, "subpixel": False}
    cpu = ("apt", np.complex64, comm, 1, "linear", False)
    gpu = ("apt", np.complex64, comm, 1, "linear", True)
    needs = {s: _plan_memory(layout, *gpu, s, check=False)["bytes_node"] for s in (1, 2, 4)}
    assert needs[1] > needs[2] > needs[4]
    monkeypatch.setattr(ptmpi.memory, "available_bytes", lambda: 10 * needs[1])
    assert _choose_slabs("auto", None, layout, *cpu) == 4
    assert _choose_slabs("auto", None, layout, *gpu) == 1
    assert _choose_slabs("auto", "--model exp (the linear model only)", layout, *cpu) == 1
    assert _choose_slabs("auto", None, {**layout, "shape": (8, 256, 256)}, *cpu) == 2
    assert _choose_slabs("auto", None, {**layout, "shape": (7, 256, 256)}, *cpu) == 1
    assert _choose_slabs(2, None, layout, *cpu) == 2  # as asked
    between = (needs[1] + needs[2]) // 2
    monkeypatch.setattr(ptmpi.memory, "available_bytes", lambda: between)
    assert _choose_slabs("auto", None, layout, *gpu) == 2
    monkeypatch.setattr(ptmpi.memory, "available_bytes", lambda: needs[4] // 2)
    assert _choose_slabs("auto", None, layout, *gpu) == 4


def test_node_slabs_follow_the_ranks_per_node():
    from ptmpi.reconstruct import _node_slabs

    class Nodes:  # what allgather of local_size returns on the ranks of a few nodes
        def __init__(self, sizes):
            self.sizes, self.local_size = sizes, sizes[0]

        def allgather(self, value):
            return list(self.sizes)

    assert _node_slabs(Nodes([4, 4, 4, 4]), 64) == 4
    assert _node_slabs(Nodes([6] * 6 + [4] * 4), 64) == 2  # unlike nodes: their gcd
    assert _node_slabs(Nodes([3, 3, 3, 2, 2]), 64) == 1
    assert _node_slabs(Nodes([8] * 8), 16) == 4  # slabs of at least 4 slices
    assert _node_slabs(Nodes([8] * 8), 3) == 1
    assert _node_slabs(Nodes([1, 1]), 64) == 1  # one rank per node: replicated


# ---------------------------------------------------------------------------- device path


def _device_params():
    """The strict stand-in for CuPy (``strict_xp``: numpy underneath, no implicit host
    transfers) everywhere; CuPy where it sees a GPU (marked ``gpu``)."""
    from ptmpi.backend import gpu_available

    return [pytest.param("strict", id="strict"),
            pytest.param("cupy", id="cupy", marks=[
                pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="no usable GPU")])]


def _device_module(name):
    if name == "strict":
        import strict_xp

        return strict_xp
    from ptmpi.backend import get_array_module

    return get_array_module(True)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_slab_communication_stages_device_arrays(mpi_ranks, caplog):
    """alltoallv, sendrecv and gatherv of the slab grid take device arrays (strict
    stand-in): the results equal those of the host arrays and land on the device; the
    staging is logged once, by world rank 0, for the world and its sub-communicators."""
    import logging

    import strict_xp

    from ptmpi.backend import get_xp, to_device, to_host

    caplog.set_level(logging.INFO, logger="ptmpi.parallel.comm")
    comm = MPIComm()
    me, other = comm.rank, 1 - comm.rank
    group = comm.split(0, me)
    send = (np.arange(6) + 10 * me + 1j * me).astype(np.complex64)
    counts = [3, 3]
    host = np.empty(6, np.complex64)
    group.alltoallv(send, counts, host, counts)
    dev = strict_xp.empty(6, dtype=np.complex64)
    before = strict_xp.synchronize_calls[0]
    group.alltoallv(to_device(send, strict_xp), counts, dev, counts)
    assert strict_xp.synchronize_calls[0] > before  # synchronized before MPI
    assert get_xp(dev) is strict_xp and np.array_equal(to_host(dev), host)
    got = group.sendrecv(to_device(send, strict_xp), other, other)
    assert get_xp(got) is strict_xp
    assert np.array_equal(to_host(got), group.sendrecv(send, other, other))
    one_way = group.sendrecv(to_device(send, strict_xp), 1 if me == 0 else None,
                             0 if me == 1 else None)  # rank 0 -> rank 1 only
    if me == 0:
        assert one_way is None
    else:
        assert get_xp(one_way) is strict_xp
        assert np.array_equal(to_host(one_way), np.arange(6).astype(np.complex64))
    out = np.empty(12, np.complex64) if me == 0 else None
    group.gatherv(to_device(send, strict_xp), out, [6, 6])
    if me == 0:
        assert np.array_equal(out[:6], send) and np.array_equal(out[6:], send + 10 + 1j)
    comm.allreduce_sum(strict_xp.ones(2))
    staged = [r for r in caplog.records if "staged through host memory" in r.getMessage()]
    assert len(staged) == (1 if me == 0 else 0)


# Tolerances of the device runs against the numpy runs. On the strict stand-in the
# device run takes the array-expression path (no compiled kernels), so it is compared
# tightly (1e-6, as in test_device_path.py) with the numpy slab run on that same path
# (kernels off; measured: equal bit for bit). The numpy slab run with the compiled kernels
# equals the one-rank run bit for bit; the kernels and the array expressions differ at
# rounding level of float32 (other summation orders), which the nonconvex iteration
# amplifies: after 10 iterations the one-rank numpy runs with and without kernels differ
# by 1.2e-4 (relative), so the device run is compared with those runs to 1e-3. CuPy
# (other FFTs, other reductions) is compared to 5e-2 throughout, as in test_device_path.py.
DEVICE_RTOL = {"strict": (1e-6, 1e-3), "cupy": (5e-2, 5e-2)}


@pytest.mark.mpi(ranks=[2, 4], timeout=300, unit="s")
@pytest.mark.parametrize("device", _device_params())
def test_apt_slabs_on_the_device_path_equal_numpy(mpi_ranks, device, monkeypatch):
    """S = 2 (and S = 4 on 4 ranks): APT for 10 iterations with every volume array on the
    device module equals the numpy slab run on the same (array-expression) path, and the
    numpy slab run with compiled kernels and the one-rank numpy run within the rounding
    amplification (DEVICE_RTOL); the state stays on the device."""
    from ptmpi.backend import get_xp, to_host

    same_path, kernel_path = DEVICE_RTOL[device]
    xp = _device_module(device)
    comm = MPIComm()
    data = comm.bcast(tiny_data() if comm.is_root else None)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    settings = SolverSettings(iterations=10, tol=0)
    ref = solve(problem(data, 0, N_ANGLES), settings, SerialComm())[0] if comm.is_root \
        else None
    for slabs in sorted({2, comm.size}):
        grid = _grid(comm, slabs)
        vol = grid.volume(SHAPE)
        host, _ = solve(problem(data, a0, a1), settings, comm, layout=grid)
        with monkeypatch.context() as m:
            m.setattr(kernels, "ENABLED", False)
            plain, _ = solve(problem(data, a0, a1), settings, comm, layout=grid)
        dev, _ = solve(problem(data, a0, a1), settings, comm, layout=grid, xp=xp)
        assert get_xp(dev.u) is xp and get_xp(dev.lam1) is xp and get_xp(dev.p) is xp
        assert dev.u.shape == vol.local_shape
        assert isinstance(to_host(dev.u), np.ndarray)
        u_host, u_plain, u_dev = vol.gather(host.u), vol.gather(plain.u), vol.gather(dev.u)
        if comm.is_root:
            assert isinstance(u_dev, np.ndarray)
            diffs = (rel(u_dev, u_plain), rel(u_dev, u_host), rel(u_dev, ref.u))
            print(f"ranks {comm.size}, slabs {slabs}, {device}: |u_dev - u_numpy_same_path| = "
                  f"{diffs[0]:.3g}, |u_dev - u_numpy_slabs| = {diffs[1]:.3g}, "
                  f"|u_dev - u_one_rank| = {diffs[2]:.3g}")
            assert diffs[0] <= same_path, diffs
            assert diffs[1] <= kernel_path and diffs[2] <= kernel_path, diffs
            np.testing.assert_allclose(dev.history["r_factor"], plain.history["r_factor"],
                                       rtol=same_path)
            np.testing.assert_allclose(dev.history["r_factor"], host.history["r_factor"],
                                       rtol=kernel_path)
            assert rel(u_host, ref.u) <= 1e-5
    comm.barrier()


@pytest.mark.mpi(ranks=[2], timeout=300, unit="s")
@pytest.mark.parametrize("device", _device_params())
def test_reconstruct_gpu_slabs_writes_the_numpy_volume(mpi_ranks, device, shared_tmp,
                                                       monkeypatch):
    """``reconstruct(..., gpu=True, slabs=2)`` on 2 ranks (through the strict stand-in, or
    CuPy), stopped after 5 of 10 iterations with a checkpoint (written and read by slab)
    and resumed, writes the volume and R-factors of the uninterrupted numpy run with
    ``slabs=2`` (compiled kernels off: the same arithmetic; kernels on: DEVICE_RTOL's second
    tolerance)."""
    import strict_xp

    import ptmpi.reconstruct as reconstruct_module
    from ptmpi.backend import get_xp

    same_path, kernel_path = DEVICE_RTOL[device]
    comm = MPIComm()
    path = shared_tmp / "tiny.h5"
    if comm.is_root:
        _write_input(path, tiny_data())
    comm.barrier()
    settings = SolverSettings(iterations=10, tol=0)

    def run(name, **kwargs):
        reconstruct_module.reconstruct(str(path), str(shared_tmp / name), settings, comm,
                                       figures=False, slabs=2, **kwargs)

    run("host.h5")
    with monkeypatch.context() as m:
        m.setattr(kernels, "ENABLED", False)
        run("plain.h5")
    if device == "strict":
        monkeypatch.setattr(reconstruct_module, "get_array_module",
                            lambda gpu: strict_xp if gpu else np)
        monkeypatch.setattr(reconstruct_module, "select_device", lambda local_rank: 0)
    synced = strict_xp.synchronize_calls[0]
    # 5 iterations with a checkpoint (written by slab), then resumed (read by slab) to 10
    ck = str(shared_tmp / "ck.h5")
    reconstruct_module.reconstruct(str(path), str(shared_tmp / "part.h5"),
                                   SolverSettings(iterations=5, tol=0), comm, figures=False,
                                   slabs=2, gpu=True, checkpoint=ck, checkpoint_every=5)
    import ptmpi.io.checkpoint as checkpoint_module

    read = checkpoint_module.read_checkpoint
    resumed = []

    def spy(*args, **kwargs):  # the resume reads this rank's slab onto the device
        state = read(*args, **kwargs)
        resumed.append((state.iteration, kwargs.get("z_range"), get_xp(state.u)))
        return state

    monkeypatch.setattr(checkpoint_module, "read_checkpoint", spy)
    run("dev.h5", gpu=True, checkpoint=ck, resume=True)
    vol = _grid(comm, 2).volume(SHAPE)
    assert resumed == [(5, (vol.z0, vol.z1), _device_module(device))]
    if device == "strict":  # the solver ran on strict arrays (it synchronized them)
        assert strict_xp.synchronize_calls[0] > synced
    comm.barrier()
    if comm.is_root:
        import json

        out = {}
        for name in ("host", "plain", "dev"):
            with h5py.File(shared_tmp / f"{name}.h5") as f:
                out[name] = (f[VOLUME][()], f["entry_1/ptmpi/metrics/r_factor"][()])
                params = json.loads(f["entry_1/process_1/parameters"][()])
            assert params["slabs"] == 2, name  # the run took the slab grid
        u_dev, r_dev = out["dev"]
        assert u_dev.shape == SHAPE
        diffs = (rel(u_dev, out["plain"][0]), rel(u_dev, out["host"][0]))
        print(f"reconstruct, 2 ranks, slabs 2, {device}: |u_dev - u_numpy_same_path| = "
              f"{diffs[0]:.3g}, |u_dev - u_numpy| = {diffs[1]:.3g}")
        assert diffs[0] <= same_path and diffs[1] <= kernel_path, diffs
        np.testing.assert_allclose(r_dev, out["plain"][1], rtol=same_path)
        np.testing.assert_allclose(r_dev, out["host"][1], rtol=kernel_path)
        assert r_dev[-1] < r_dev[0]
        with h5py.File(ck) as f:
            assert f["u"].shape == SHAPE
    comm.barrier()


@pytest.mark.mpi(ranks=[2], timeout=120, unit="s")
def test_default_layout_is_one_slab_per_rank_of_the_node(mpi_ranks, shared_tmp):
    """``reconstruct`` with its default (``auto``) on 2 ranks of one node takes one z-slab
    per rank, with the volume of the replicated layout bit for bit; a run the slab grid
    refuses (the coarse start) keeps the replicated volume; the 2-step start takes the
    slabs, with the replicated run's volume."""
    import json

    from ptmpi.reconstruct import reconstruct

    comm = MPIComm()
    path = shared_tmp / "tiny.h5"
    if comm.is_root:
        _write_input(path, tiny_data())
    comm.barrier()
    runs = {"auto": ({}, SolverSettings(iterations=6, tol=0)),
            "replicated": ({"slabs": 1}, SolverSettings(iterations=6, tol=0)),
            "coarse": ({}, SolverSettings(iterations=2, tol=0, start="coarse",
                                          start_iterations=2)),
            "two-step": ({}, SolverSettings(iterations=4, tol=0, start="two-step",
                                            start_iterations=4)),
            "two-step-replicated": ({"slabs": 1}, SolverSettings(
                iterations=4, tol=0, start="two-step", start_iterations=4))}
    for name, (kwargs, settings) in runs.items():
        reconstruct(str(path), str(shared_tmp / f"{name}.h5"), settings, comm, figures=False,
                    **kwargs)
    comm.barrier()
    if comm.is_root:
        out = {}
        for name in runs:
            with h5py.File(shared_tmp / f"{name}.h5") as f:
                out[name] = (json.loads(f["entry_1/process_1/parameters"][()])["slabs"],
                             f[VOLUME][()])
        assert [out[name][0] for name in runs] == [2, 1, 1, 2, 1]
        assert np.array_equal(out["auto"][1], out["replicated"][1])
        two, rep = out["two-step"][1], out["two-step-replicated"][1]
        assert np.linalg.norm(two - rep) <= 1e-6 * np.linalg.norm(rep)
        assert np.linalg.norm(two - out["auto"][1]) > 1e-3 * np.linalg.norm(rep)
