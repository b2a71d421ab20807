"""Distributed reading, operators, solver and driver against their serial selves (2 and 4 ranks).

Every multi-rank test builds one tiny case (volume 12 x 16 x 16, probe 8, 7 angles, scan
jitter so that every angle has its own positions, windows hanging over the image edge) and
compares what the ranks compute together with a serial computation of the same thing in
the same process. 7 angles over 2 or 4 ranks give uneven blocks (4+3, 2+2+2+1).

The last two tests are serial: they launch ``mpiexec`` themselves to check how the whole
job ends when something goes wrong (one clear line, non-zero exit, no hang, no traceback).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from jobs import job_env, mpiexec
from ptmpi.io.cxi import DATA, read_input, write_input
from ptmpi.operators.model import JointModel
from ptmpi.parallel import MPIComm, SerialComm, block_partition
from ptmpi.reconstruct import RunError, reconstruct
from ptmpi.sim.presets import SimulationSettings
from ptmpi.sim.simulate import simulate
from ptmpi.solvers.admm import LocalProblem, SolverSettings, solve

NZ, N, M = 12, 16, 8
N_ANGLES = 7
SHAPE = (NZ, N, N)


def tiny_settings(n_angles: int = N_ANGLES, eta: float | None = 50.0) -> SimulationSettings:
    """The tiny case: 4 x 4 windows per angle (corners -4..8 plus jitter), Poisson counts."""
    return SimulationSettings(n=N, nz=NZ, n_angles=n_angles, step=4, probe_size=M, fwhm=3.0,
                              eta=eta, seed=7, jitter=1.5)


def simulate_on_root(comm, settings: SimulationSettings | None = None):
    """Simulate once on rank 0 and broadcast, so that every rank holds the same bits."""
    data = simulate(settings or tiny_settings()) if comm.is_root else None
    return comm.bcast(data)


def write_case(path: Path, data, *, counts=None, positions=None, frame_offset=None,
               angles=None) -> None:
    """Write a SPEC 3 input file of ``data`` (simulated), with optional replacements."""
    write_input(
        path,
        counts=data.counts if counts is None else counts,
        probe=data.probe,
        positions_px=data.positions_px if positions is None else positions,
        frame_offset=data.frame_offset if frame_offset is None else frame_offset,
        angles_deg=data.angles_deg if angles is None else angles,
        volume_shape=data.volume.shape,
        truth_volume=data.volume,
        truth_probe=data.probe,
    )


def local_problem(data, a0: int, a1: int) -> LocalProblem:
    """The LocalProblem of angles ``[a0, a1)`` of simulated ``data`` (counts corner-zero)."""
    off = data.frame_offset
    f0, f1 = int(off[a0]), int(off[a1])
    return LocalProblem(
        volume_shape=SHAPE,
        theta_local=np.deg2rad(data.angles_deg[a0:a1]),
        f_local=np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)),
        positions_local=data.positions_px[f0:f1],
        frame_offset_local=off[a0 : a1 + 1] - f0,
        probe=data.probe,
    )


def rel(a, b) -> float:
    """``||a - b|| / ||b||``."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ---------------------------------------------------------------------------- reading


@pytest.mark.mpi(ranks=[2, 4], timeout=60, unit="s")
def test_read_by_rank_concatenates_to_the_serial_read(mpi_ranks, shared_tmp):
    comm = MPIComm()
    assert comm.size == mpi_ranks
    path = shared_tmp / "uneven.h5"
    if comm.is_root:
        data = simulate(tiny_settings())
        # Uneven frames per angle (16, 5, 0, 11, 16, 3, 9): the hyperslab of a block and
        # the re-based offsets are then different for every rank, one angle has no frame.
        keep_per_angle = [16, 5, 0, 11, 16, 3, 9]
        keep = np.concatenate([data.frame_offset[a] + np.arange(k)
                               for a, k in enumerate(keep_per_angle)])
        offsets = np.concatenate([[0], np.cumsum(keep_per_angle)]).astype(np.int64)
        # Distinct counts per frame, so that any misplaced frame shows.
        counts = data.counts[keep] + np.arange(keep.size, dtype=np.float32)[:, None, None]
        write_case(path, data, counts=counts, positions=data.positions_px[keep],
                   frame_offset=offsets)
    comm.barrier()

    whole = read_input(path)
    start, stop = block_partition(whole.n_angles, comm.size, comm.rank)
    mine = read_input(path, start, stop)
    blocks = comm.allgather((mine.angle_start, mine.angle_stop, mine.counts_local,
                             mine.positions_local, mine.frame_offset_local,
                             mine.angles_deg_local))

    assert whole.n_angles == N_ANGLES and whole.n_frames == 60
    assert (mine.angle_start, mine.angle_stop) == (start, stop)
    # every rank reads only its own hyperslab, re-based to 0
    f0, f1 = int(whole.frame_offset[start]), int(whole.frame_offset[stop])
    assert mine.n_frames_local == f1 - f0
    assert mine.frame_offset_local[0] == 0 and mine.frame_offset_local[-1] == f1 - f0
    # the blocks tile the angles in rank order ...
    assert [b[0] for b in blocks] == [block_partition(N_ANGLES, comm.size, p)[0]
                                      for p in range(comm.size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == N_ANGLES
    assert all(blocks[p][1] == blocks[p + 1][0] for p in range(comm.size - 1))
    # ... and their concatenation is the serial read of the whole file, bit for bit
    assert np.array_equal(np.concatenate([b[2] for b in blocks]), whole.counts_local)
    assert np.array_equal(np.concatenate([b[3] for b in blocks]), whole.positions_local)
    assert np.array_equal(np.concatenate([b[5] for b in blocks]), whole.angles_deg)
    shifted = [b[4] + whole.frame_offset[b[0]] for b in blocks]
    assert np.array_equal(np.concatenate([shifted[0]] + [s[1:] for s in shifted[1:]]),
                          whole.frame_offset)
    assert sum(b[2].shape[0] for b in blocks) == whole.n_frames
    # metadata is global on every rank
    assert np.array_equal(mine.frame_offset, whole.frame_offset)
    assert mine.volume_shape == SHAPE and mine.image_shape == (NZ, N)
    assert np.array_equal(mine.probe, whole.probe)


# ---------------------------------------------------------------------------- operators


@pytest.mark.mpi(ranks=[2, 4], timeout=60, unit="s")
def test_distributed_normal_operator_and_rhs_equal_serial(mpi_ranks):
    comm = MPIComm()
    assert comm.size == mpi_ranks
    data = simulate_on_root(comm)
    dtype = np.complex128
    probe = data.probe.astype(dtype)
    off = data.frame_offset
    theta = np.deg2rad(data.angles_deg)
    serial = JointModel(SHAPE, theta, probe, data.positions_px, off, dtype=dtype)

    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    f0, f1 = int(off[a0]), int(off[a1])
    local = JointModel(SHAPE, theta[a0:a1], probe, data.positions_px[f0:f1],
                       off[a0 : a1 + 1] - f0, dtype=dtype)

    rng = np.random.default_rng(12345)  # the same draws on every rank
    x = (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)).astype(dtype)
    y = (rng.standard_normal(serial.data_shape)
         + 1j * rng.standard_normal(serial.data_shape)).astype(dtype)

    # Collectives first, asserts after: a rank failing early must not leave the others
    # waiting in an Allreduce until the timeout.
    w_serial, w_local = serial.illumination(), local.illumination()
    normal_par = comm.allreduce_sum(local.normal(x, w_local))
    rhs_par = comm.allreduce_sum(local.adj(y[f0:f1]))
    dhd = comm.allreduce_sum(local.adj(local.fwd(x)))

    # illumination and forward model of the block are the serial ones' slices
    assert w_local.dtype == np.float64
    # (not bit for bit: overlapping windows are added in another order for fewer frames)
    assert rel(w_local, w_serial[a0:a1]) < 1e-14
    d_local = local.fwd(x)
    assert d_local.shape == (f1 - f0, M, M)
    assert rel(d_local, serial.fwd(x)[f0:f1]) < 1e-13

    normal_ser = serial.normal(x, w_serial)
    assert normal_par.dtype == dtype
    assert rel(normal_par, normal_ser) < 1e-12
    assert rel(rhs_par, serial.adj(y)) < 1e-12
    # the normal operator is D^H D (F unitary), here checked on the distributed pieces
    assert rel(dhd, normal_par) < 1e-12
    # a rank's own contribution is a genuine part of the sum, not the whole of it
    assert rel(local.normal(x, w_local), normal_ser) > 1e-3


# ---------------------------------------------------------------------------- solver


@pytest.mark.mpi(ranks=[2, 4], timeout=60, unit="s")
@pytest.mark.parametrize("dtype,tol", [(np.complex64, 1e-4), (np.complex128, 1e-10)],
                         ids=["c64", "c128"])
def test_apt_on_blocks_matches_the_serial_run(mpi_ranks, dtype, tol):
    """10 APT iterations, default settings: the same volume and R-factors as one process.

    complex64 at the SPEC's 1e-4; complex128 pins that nothing but summation order
    differs (a rank-count dependence amplified by the iteration shows there first).
    """
    comm = MPIComm()
    assert comm.size == mpi_ranks
    data = simulate_on_root(comm)
    # complex128: the unsmoothed z-step, whose closed form is as well conditioned as the
    # sums; the smoothed one (the default on counts) solves for |z| by Newton's method, and
    # at pixels near its critical count the root moves ~1e-7 for a 1e-16 change of the
    # input, which 10 nonconvex iterations carry into u (c64 keeps the default).
    settings = SolverSettings(iterations=10, epsilon=0.0 if dtype == np.complex128 else None)

    state_ser, params_ser = solve(local_problem(data, 0, N_ANGLES), settings, SerialComm(),
                                  dtype=dtype)
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state_par, params_par = solve(local_problem(data, a0, a1), settings, comm, dtype=dtype)

    u_ser, u_par = state_ser.u, state_par.u
    u_all = comm.allgather(u_par)  # the last collective: asserts come after it
    assert u_par.dtype == dtype and u_par.shape == SHAPE
    assert state_par.iteration == state_ser.iteration == 10
    # the run did something: u left its start value 1 and the R-factor fell
    assert rel(u_ser, np.ones(SHAPE)) > 1e-2
    r_ser = np.asarray(state_ser.history["r_factor"])
    r_par = np.asarray(state_par.history["r_factor"])
    assert r_ser[-1] < 0.8 * r_ser[0]

    for key in ("norm_DhD", "mean_diagonal_DhD", "tv_weight", "r1", "r2"):
        assert abs(params_par[key] - params_ser[key]) <= 1e-5 * params_ser[key]
    assert rel(u_par, u_ser) < tol
    assert r_par.shape == r_ser.shape == (10,)
    assert np.max(np.abs(r_par - r_ser) / r_ser) < tol
    # rel_change of the first step is rounding only (u_1 = u_0 = 1: z = D u_0, lam2 = 0)
    rc_par = np.asarray(state_par.history["rel_change"])
    rc_ser = np.asarray(state_ser.history["rel_change"])
    assert rc_ser[0] < 1e-5 and rc_par[0] < 1e-5
    assert np.max(np.abs(rc_par[1:] - rc_ser[1:]) / rc_ser[1:]) < 10 * tol
    # the block's split variable is the serial one's frames
    f0, f1 = int(data.frame_offset[a0]), int(data.frame_offset[a1])
    assert rel(state_par.z_local, state_ser.z_local[f0:f1]) < tol

    # u is replicated: every rank holds the same iterate, bit for bit
    assert all(np.array_equal(u, u_all[0]) for u in u_all)


@pytest.mark.mpi(ranks=[2], timeout=60, unit="s")
def test_reconstruct_driver_on_two_ranks_matches_serial(mpi_ranks, shared_tmp):
    comm = MPIComm()
    path = shared_tmp / "tiny.h5"
    out_par = shared_tmp / "rec-par.h5"
    out_ser = shared_tmp / "rec-ser.h5"
    if comm.is_root:
        write_case(path, simulate(tiny_settings()))
    comm.barrier()
    settings = SolverSettings(iterations=10)

    summary = reconstruct(str(path), str(out_par), settings, comm, figures=False)
    r_all = comm.allgather(summary["r_factor"])  # the last collective
    assert summary["iterations"] == 10
    # every rank reports the same global metrics
    assert r_all[0] == r_all[-1]
    if not comm.is_root:
        return  # rank 0 alone writes; only it compares (no collective follows)

    assert out_par.exists() and not list(shared_tmp.glob("*.png"))
    reconstruct(str(path), str(out_ser), settings, SerialComm(), figures=False)
    with h5py.File(out_par, "r") as fp, h5py.File(out_ser, "r") as fs:
        u_par = fp["entry_1/image_1/data"][...]
        u_ser = fs["entry_1/image_1/data"][...]
        assert fp["entry_1/process_1/n_ranks"][()] == 2
        assert fs["entry_1/process_1/n_ranks"][()] == 1
        metrics_par = {k: fp["entry_1/ptmpi/metrics"][k][...] for k in ("r_factor", "snr_db")}
        metrics_ser = {k: fs["entry_1/ptmpi/metrics"][k][...] for k in ("r_factor", "snr_db")}
        iterations = fp["entry_1/ptmpi/metrics/iteration"][...]
    assert u_par.shape == SHAPE and u_par.dtype == np.complex64
    assert rel(u_ser, np.ones(SHAPE)) > 1e-2
    assert rel(u_par, u_ser) < 1e-4
    assert iterations.tolist() == list(range(1, 11))
    r_par, r_ser = metrics_par["r_factor"], metrics_ser["r_factor"]
    assert r_par.shape == (10,) and np.max(np.abs(r_par - r_ser) / r_ser) < 1e-4
    assert r_par[-1] == pytest.approx(summary["r_factor"], rel=1e-12)
    assert np.max(np.abs(metrics_par["snr_db"] - metrics_ser["snr_db"])) < 1e-3


@pytest.mark.mpi(ranks=[4], timeout=60, unit="s")
def test_fewer_angles_than_ranks_is_a_clear_error_on_every_rank(mpi_ranks, shared_tmp):
    comm = MPIComm()
    path = shared_tmp / "three.h5"
    out = shared_tmp / "rec.h5"
    if comm.is_root:
        write_case(path, simulate(tiny_settings(n_angles=3)))
    comm.barrier()
    with pytest.raises(RunError) as info:
        reconstruct(str(path), str(out), SolverSettings(iterations=2), comm, figures=False)
    message = str(info.value)
    assert "4 ranks" in message and "3 angles" in message and str(path) in message
    # the same message on every rank, and nothing written
    assert set(comm.allgather(message)) == {message}
    assert not out.exists()


# ---------------------------------------------------------------------------- whole jobs


def _run_job(args: list[str], cwd: Path, timeout: float = 60):
    t0 = time.perf_counter()
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, *args], cwd=cwd,
                          env=job_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


_FAIL_ON_RANK_1 = """
    import sys

    import ptmpi.reconstruct
    from ptmpi.cli import main

    _solve = ptmpi.reconstruct.solve


    def solve(problem, settings, comm, **kwargs):
        # Rank 1 fails on entering the solver; rank 0 goes on into the solver's first
        # Allreduce and would wait there forever unless the whole job is ended.
        if comm.rank == 1:
            raise RuntimeError("injected failure")
        return _solve(problem, settings, comm, **kwargs)


    ptmpi.reconstruct.solve = solve
    sys.exit(main(sys.argv[1:]))
"""


def test_an_error_on_one_rank_ends_the_whole_job_promptly(tmp_path):
    write_case(tmp_path / "tiny.h5", simulate(tiny_settings()))
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(textwrap.dedent(_FAIL_ON_RANK_1))
    proc, wall = _run_job([str(script), "reconstruct", "tiny.h5", "-o", "rec.h5",
                           "--iterations", "100000", "--no-figures"], tmp_path)
    assert proc.returncode != 0
    assert wall < 30
    # One error report, from the failing rank (rank 0's progress lines may come too).
    # Counted in the whole text, not per line: mpiexec merges the ranks' streams, and a
    # line written in two pieces can be split by another rank's output.
    assert proc.stderr.count("error") == 1, proc.stderr
    assert "ptmpi reconstruct: error on rank 1: RuntimeError: injected failure" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "rec.h5").exists()


def test_bad_input_gives_one_clear_error_under_two_ranks(tmp_path):
    data = simulate(tiny_settings())
    counts = data.counts.copy()
    bad_frame = int(data.frame_offset[N_ANGLES - 1]) + 2  # in rank 1's block only
    counts[bad_frame, 3, 4] = -5.0
    write_case(tmp_path / "bad.h5", data, counts=counts)
    proc, wall = _run_job(["-m", "ptmpi", "reconstruct", "bad.h5", "-o", "out.h5"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("ptmpi reconstruct: error:")
    assert DATA in line and "negative" in line and f"frame {bad_frame}" in line
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
    assert wall < 30


@pytest.mark.mpi(ranks=[3], timeout=60, unit="s")
def test_the_r2_rule_does_not_depend_on_the_rank_count(mpi_ranks):
    """Where ``r2 = r2_factor d / L`` is below its cap (large volumes; here the cap is
    lifted on a tiny case), ``L`` and ``d`` are reduced over the ranks: the same ``r2``
    and, after 10 iterations, the same volume as one process."""
    comm = MPIComm()
    data = simulate_on_root(comm)
    settings = SolverSettings(iterations=10, r2_default_max=10.0, r2_ray_factor=0.0)
    state_ser, params_ser = solve(local_problem(data, 0, N_ANGLES), settings, SerialComm())
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state_par, params_par = solve(local_problem(data, a0, a1), settings, comm)
    comm.barrier()
    rule = 20 * params_ser["mean_diagonal_DhD"] / params_ser["norm_DhD"]
    assert params_ser["r2"] == pytest.approx(rule, rel=1e-12) and rule != 0.1
    assert params_par["r2"] == pytest.approx(params_ser["r2"], rel=1e-6)
    assert rel(state_par.u, state_ser.u) < 1e-4
    assert rel(state_ser.u, np.ones(SHAPE)) > 1e-2


@pytest.mark.mpi(ranks=[3], timeout=120, unit="s")
def test_converged_noisy_apt_does_not_depend_on_the_rank_count(mpi_ranks):
    """Default APT on Poisson counts, run to its convergence stop: 1 and 3 ranks agree to
    1e-4 (before the solver converged, rounding grew without bound: 1e-3 after 150
    iterations on a case of the solver issue)."""
    comm = MPIComm()
    data = simulate_on_root(comm, tiny_settings(n_angles=6, eta=5.0))
    settings = SolverSettings(iterations=300)
    state_ser, _ = solve(local_problem(data, 0, 6), settings, SerialComm())
    a0, a1 = block_partition(6, comm.size, comm.rank)
    state_par, _ = solve(local_problem(data, a0, a1), settings, comm)
    n_ser, n_par = state_ser.iteration, state_par.iteration
    comm.barrier()
    assert n_ser < 300 and abs(n_par - n_ser) <= 2  # both stopped on convergence
    assert max(state_ser.history["rel_change"][-5:]) < 1e-4
    assert rel(state_par.u, state_ser.u) < 1e-4


@pytest.mark.mpi(ranks=[2, 4], timeout=120, unit="s")
def test_a_2d_dataset_splits_its_frames_over_the_ranks(mpi_ranks, shared_tmp):
    """One angle, no volume: ptycho2d on 2 and 4 ranks gives the image and probe of one
    rank (frames block-partitioned; the image update's sums are reduced). complex128: in
    complex64 the nonconvex iteration amplifies the order of the sums over frames to about
    2e-3 after 12 iterations on this tiny case, as it amplifies compiled-vs-numpy rounding."""
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings

    comm = MPIComm()
    path = shared_tmp / "single.h5"
    out_par = shared_tmp / "p-par.h5"
    out_ser = shared_tmp / "p-ser.h5"
    if comm.is_root:
        data = simulate(tiny_settings(n_angles=1))
        write_input(path, counts=data.counts, probe=data.probe,
                    positions_px=data.positions_px, frame_offset=data.frame_offset,
                    angles_deg=data.angles_deg, volume_shape=None)
    comm.barrier()
    settings = Ptycho2DSettings(iterations=12, refine_probe=True)
    summary = reconstruct(str(path), str(out_par), settings, comm, algorithm="ptycho2d",
                          figures=False, dtype=np.complex128)
    r_all = comm.allgather(summary["r_factor"])
    assert r_all[0] == r_all[-1]
    if not comm.is_root:
        return
    reconstruct(str(path), str(out_ser), settings, SerialComm(), algorithm="ptycho2d",
                figures=False, dtype=np.complex128)
    with h5py.File(out_par, "r") as fp, h5py.File(out_ser, "r") as fs:
        v_par, v_ser = fp["entry_1/image_1/data"][...], fs["entry_1/image_1/data"][...]
        p_par = fp["entry_1/image_2/data"][...]
        p_ser = fs["entry_1/image_2/data"][...]
        pos_par = fp["entry_1/image_1/positions_px"][...]
        pos_ser = fs["entry_1/image_1/positions_px"][...]
        r_par = fp["entry_1/ptmpi/metrics/r_factor"][...]
        r_ser = fs["entry_1/ptmpi/metrics/r_factor"][...]
    assert v_par.shape == v_ser.shape and v_par.shape[0] == 1
    assert rel(v_ser, np.ones_like(v_ser)) > 1e-2  # the run did something
    assert rel(v_par, v_ser) < 1e-6 and rel(p_par, p_ser) < 1e-6
    np.testing.assert_array_equal(pos_par, pos_ser)
    assert np.max(np.abs(r_par - r_ser) / r_ser) < 1e-6


@pytest.mark.mpi(ranks=[2, 3], timeout=120, unit="s")
def test_apt_with_one_angle_splits_its_frames_and_resumes(mpi_ranks, shared_tmp):
    """APT on a one-angle tomography file: the frames are split over the ranks and the data
    term reduces their partial sums; the result is that of one rank (complex128), and a
    checkpoint written by the split ranks resumes on one."""
    comm = MPIComm()
    path = shared_tmp / "one-angle.h5"
    out_par, out_ser = shared_tmp / "a-par.h5", shared_tmp / "a-ser.h5"
    ck = shared_tmp / "ck.h5"
    if comm.is_root:
        write_case(path, simulate(tiny_settings(n_angles=1)))
    comm.barrier()
    settings = SolverSettings(iterations=8, tol=0.0)
    reconstruct(str(path), str(out_par), settings, comm, figures=False, dtype=np.complex128,
                checkpoint=str(ck), checkpoint_every=4)
    comm.barrier()
    if not comm.is_root:
        return
    reconstruct(str(path), str(out_ser), settings, SerialComm(), figures=False,
                dtype=np.complex128)
    out_res = shared_tmp / "a-res.h5"
    ck.rename(shared_tmp / "ck-mid.h5")  # resume from iteration 8 to 12 on one rank
    longer = SolverSettings(iterations=12, tol=0.0)
    reconstruct(str(path), str(out_res), longer, SerialComm(), figures=False,
                dtype=np.complex128, checkpoint=str(shared_tmp / "ck-mid.h5"), resume=True)
    with h5py.File(out_par, "r") as fp, h5py.File(out_ser, "r") as fs:
        u_par, u_ser = fp["entry_1/image_1/data"][...], fs["entry_1/image_1/data"][...]
        r_par = fp["entry_1/ptmpi/metrics/r_factor"][...]
        r_ser = fs["entry_1/ptmpi/metrics/r_factor"][...]
    with h5py.File(out_res, "r") as f:
        assert f["entry_1/ptmpi/metrics/iteration"][...].tolist() == list(range(1, 13))
    assert rel(u_ser, np.ones(SHAPE)) > 1e-3
    assert rel(u_par, u_ser) < 1e-6
    assert np.max(np.abs(r_par - r_ser) / r_ser) < 1e-6


@pytest.mark.mpi(ranks=[3], timeout=120, unit="s")
def test_tv_continuation_and_settling_do_not_depend_on_the_rank_count(mpi_ranks):
    """Noise-free data with the TV continuation (its floor lowered so that this tiny case
    has one) and the settling phase from iteration 15: 1 and 3 ranks use the same weight
    and ``r2`` at every iteration and end at the same volume."""
    comm = MPIComm()
    data = simulate_on_root(comm, tiny_settings(eta=None))
    settings = SolverSettings(iterations=30, tol=0.0, tv_continuation_start=4,
                              tv_continuation_rate=0.8, tv_continuation_voxel=0.0)
    state_ser, params_ser = solve(local_problem(data, 0, N_ANGLES), settings, SerialComm())
    a0, a1 = block_partition(N_ANGLES, comm.size, comm.rank)
    state_par, params_par = solve(local_problem(data, a0, a1), settings, comm)
    comm.barrier()
    assert params_ser["r2_adapt_from"] == params_par["r2_adapt_from"] == 15
    assert state_par.history["tv_weight"] == pytest.approx(state_ser.history["tv_weight"],
                                                           rel=1e-6)
    assert state_ser.history["tv_weight"][-1] < 0.2 * params_ser["tv_weight"]
    assert state_par.history["r2"] == pytest.approx(state_ser.history["r2"], rel=1e-6)
    assert rel(state_par.u, state_ser.u) < 1e-4
