"""``ptmpi bench``: operator and iteration timings against this machine's floors.

Every figure is a median of ``--repeat`` runs after a warm-up, measured in one run beside
the floors it is compared with (:mod:`ptmpi.bench.floors`). Cases follow the paper's
geometry scaled to the size ``n``: volume ``n^3``, probe ``n/2`` of FWHM ``14 n/128``, grid
step ``n/4`` (the paper's step 32 at 128), angles over [0, pi). Data are simulated on
every rank (deterministic) and each rank keeps its block of angles, as in a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import tracemalloc

import numpy as np

from ptmpi.parallel import block_partition

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchCase:
    n: int
    angles: int
    step: int | None = None
    algorithm: str = "apt"

    def simulation(self):
        from ptmpi.sim.presets import SimulationSettings

        m = self.n // 2
        return SimulationSettings(n=self.n, nz=self.n, n_angles=self.angles,
                                  step=self.step or max(1, self.n // 4), probe_size=m,
                                  fwhm=14.0 * self.n / 128)


def machine_info(comm) -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import scipy

    from ptmpi.operators.fft import workers

    return {"cpu": model, "cores": os.cpu_count(), "ranks": comm.size,
            "ranks_per_node": comm.local_size, "fft_threads_per_rank": workers(),
            "numpy": np.__version__, "scipy": scipy.__version__}


def _local_problem(case: BenchCase, comm, dtype):
    from ptmpi.sim.simulate import simulate
    from ptmpi.solvers.admm import LocalProblem

    data = simulate(case.simulation())
    start, stop = block_partition(case.angles, comm.size, comm.rank)
    offset = data.frame_offset
    f0, f1 = int(offset[start]), int(offset[stop])
    counts = np.fft.ifftshift(data.counts[f0:f1], axes=(-2, -1)).astype(np.float32)
    problem = LocalProblem(
        volume_shape=data.volume.shape, theta_local=np.deg2rad(data.angles_deg[start:stop]),
        f_local=counts, positions_local=data.positions_px[f0:f1],
        frame_offset_local=offset[start:stop + 1] - f0, probe=data.probe)
    return problem, data.volume.astype(dtype)


def time_operators(problem, volume, repeat: int, xp, dtype) -> dict:
    """Medians (seconds) of the projector, far-field batch and windowing on local data."""
    from ptmpi.backend import real_dtype, to_device, to_host
    from ptmpi.bench.floors import median_time
    from ptmpi.operators.model import JointModel
    from ptmpi.solvers.prox import update_data_split

    model = JointModel(problem.volume_shape, problem.theta_local,
                       to_device(problem.probe, xp).astype(dtype), problem.positions_local,
                       problem.frame_offset_local, dtype=dtype)
    u = to_device(volume, xp)
    proj = model.projector.fwd(u)
    psi = model.ptycho.fwd(proj)
    nz = problem.volume_shape[0]
    n_theta = len(problem.theta_local)
    out = {
        "projector_fwd_s": median_time(lambda: model.projector.fwd(u), repeat, xp),
        "projector_adj_s": median_time(lambda: model.projector.adj(proj), repeat, xp),
        "fft_batch_s": median_time(lambda: model.farfield.adj(model.farfield.fwd(psi)),
                                   repeat, xp),
        "windowing_s": median_time(lambda: model.ptycho.adj(model.ptycho.fwd(proj)), repeat,
                                   xp),
        "nnz": int(model.projector._matrix_pair(np, np.float32)[0].nnz),
    }
    # The z-step on this rank's frames: the closed form (noise-free data) and the smoothed
    # likelihood of photon counts (epsilon 10 photons, the default there; a Newton root
    # per pixel), on Poisson counts of the model's own intensities.
    d = model.farfield.fwd(psi)
    counts = np.random.default_rng(0).poisson(np.abs(to_host(d)) ** 2)
    counts = to_device(counts.astype(real_dtype(dtype)), xp)
    for key, eps in (("zstep_s", 0.0), ("zstep_counts_s", 10.0)):
        out[key] = median_time(lambda eps=eps: update_data_split(
            d, xp.zeros_like(d), counts, 0.1, "ipm", epsilon=eps), repeat, xp)
    # A complex slice counts as two real slices (as a real projector would need).
    out["projector_fwd_us_per_slice_angle"] = out["projector_fwd_s"] / (2 * nz * n_theta) * 1e6
    return out


def time_iteration(problem, repeat: int, comm, xp, dtype, algorithm: str,
                   slabs: int = 1) -> dict:
    """One APT (or APTs) iteration: median wall time and its stage breakdown (means).
    ``slabs > 1``: on the angle x slab grid (``reconstruct --slabs``)."""
    from ptmpi.bench.stages import STAGES, instrumented
    from ptmpi.solvers.admm import SolverSettings, solve

    settings = SolverSettings(algorithm=algorithm, iterations=1 + repeat)
    layout = {}
    if slabs > 1:
        from ptmpi.parallel.slab_data_term import SlabGrid

        layout = {"layout": SlabGrid(comm, slabs)}
    with instrumented(comm, xp) as timer:
        def after(_state, row):
            if row["iteration"] == 1:  # the first iteration is the warm-up
                timer.reset()

        state, _ = solve(problem, settings, comm, xp=xp, dtype=dtype, callback=after,
                         **layout)
    wall = state.history["wall_s"]
    per_iteration = np.diff(wall)
    mean = float(per_iteration.mean())
    stages = {k: v / repeat for k, v in timer.totals.items()}
    stages["other"] = max(0.0, mean - sum(v for k, v in stages.items() if k != "other"))
    assert set(stages) == set(STAGES)
    return {"iteration_s": float(statistics.median(per_iteration)),
            "iteration_mean_s": mean, "stages_s": stages,
            "cg_iterations": settings.cg_iterations}


def measure_memory(problem, comm, xp, dtype, algorithm: str) -> int:
    """Peak bytes of arrays allocated by two solver iterations (``tracemalloc``)."""
    from ptmpi.solvers.admm import SolverSettings, solve

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve(problem, SolverSettings(algorithm=algorithm, iterations=2), comm, xp=xp,
              dtype=dtype)
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


def time_astra(n: int, angles: int, repeat: int) -> dict | None:
    """ASTRA's CPU parallel-beam forward projection of one real slice (seconds per
    slice and angle) for its ``strip`` (area, our model), ``linear`` and ``line`` kernels;
    None when ``astra`` does not import."""
    try:
        import astra
    except ImportError:
        return None
    from ptmpi.bench.floors import median_time

    vol_geom = astra.create_vol_geom(n, n)
    proj_geom = astra.create_proj_geom("parallel", 1.0, n,
                                       np.linspace(0, np.pi, angles, endpoint=False))
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("strip", "linear", "line"):
        projector = astra.create_projector(kind, proj_geom, vol_geom)
        vol_id = astra.data2d.create("-vol", vol_geom, rng.random((n, n), dtype=np.float32))
        sino_id = astra.data2d.create("-sino", proj_geom, 0)
        cfg = astra.astra_dict("FP")
        cfg.update(ProjectorId=projector, VolumeDataId=vol_id, ProjectionDataId=sino_id)
        alg = astra.algorithm.create(cfg)
        out[kind] = median_time(lambda a=alg: astra.algorithm.run(a), repeat) / angles
        astra.algorithm.delete(alg)
        astra.data2d.delete([vol_id, sino_id])
        astra.projector.delete(projector)
    return out


def bench_case(case: BenchCase, comm, repeat: int, xp, dtype, *, operators: bool = True,
               memory: bool = True, slabs: int = 1) -> dict:
    """Everything ``ptmpi bench`` reports for one case, as seen by this rank."""
    from ptmpi.bench.floors import fft_floor, fma_rate, iteration_floor, memory_bandwidth
    from ptmpi.memory import NNZ_PER_VOXEL_ANGLE, peak_resident_bytes, predict_arrays

    problem, volume = _local_problem(case, comm, dtype)
    n_frames = problem.f_local.shape[0]
    m = problem.probe.shape[-1]
    row = {"n": case.n, "angles": case.angles, "step": case.simulation().step,
           "algorithm": case.algorithm, "ranks": comm.size,
           "angles_local": len(problem.theta_local), "frames_local": n_frames}
    comm.barrier()
    if operators:
        row.update(time_operators(problem, volume, repeat, xp, dtype))
    comm.barrier()
    row["slabs"] = slabs
    row.update(time_iteration(problem, repeat, comm, xp, dtype, case.algorithm, slabs))
    bandwidth = memory_bandwidth(xp=xp)
    fft_seconds = fft_floor((n_frames, m, m), dtype, repeat, xp)
    fmas = fma_rate(xp=xp)
    nnz = row.get("nnz") or int(NNZ_PER_VOXEL_ANGLE * len(problem.theta_local) * case.n**2)
    floors = iteration_floor(
        volume_shape=problem.volume_shape, n_theta_local=len(problem.theta_local),
        n_frames_local=n_frames, probe_size=m, nnz=nnz, cg_iterations=row["cg_iterations"],
        n_ranks=comm.size, itemsize=np.dtype(dtype).itemsize, bandwidth=bandwidth,
        fft_seconds=fft_seconds, fma_per_second=fmas)
    row.update(bandwidth_gb_s=bandwidth / 1e9, fft_floor_s=fft_seconds,
               gfma_per_s=fmas / 1e9, floors_s=floors)
    if memory and xp is not np:
        # tracemalloc sees host allocations only: on a GPU it would compare the device
        # plan with the few host arrays of the run (measured so on an H200: +947%).
        row["memory_note"] = "solver arrays live on the GPU: not measured (host tracing only)"
    elif memory:
        predicted = predict_arrays(problem.volume_shape, n_frames, m, len(problem.theta_local),
                                   case.algorithm, dtype)
        row["memory_predicted_bytes"] = predicted["solver"] + predicted["projector"]
        row["memory_measured_bytes"] = measure_memory(problem, comm, xp, dtype, case.algorithm)
        row["peak_rss_bytes"] = peak_resident_bytes()
    return row


def run_bench(sizes, angles: int, step: int | None, repeat: int, comm, *, xp=np,
              dtype=np.complex64, algorithm: str = "apt", astra: bool = True,
              iteration_only: bool = False, slabs: int = 1) -> dict:
    """All cases; rows from every rank are gathered, rank 0's are reported, the iteration
    time is the slowest rank's. ``slabs > 1`` (with ``iteration_only``): the iteration on
    the angle x slab grid."""
    if slabs > 1 and not iteration_only:
        raise ValueError("bench with --slabs > 1 times the iteration only (--iteration-only): "
                         "its floors and memory are those of the replicated layout")
    result = {"machine": machine_info(comm), "repeat": repeat, "dtype": np.dtype(dtype).name,
              "cases": []}
    for n in sizes:
        case = BenchCase(n=n, angles=angles, step=step, algorithm=algorithm)
        logger.info("bench: %d^3, %d angles, %s on %d rank(s)", n, angles, algorithm,
                    comm.size)
        row = bench_case(case, comm, repeat, xp, dtype, operators=not iteration_only,
                         memory=not iteration_only, slabs=slabs)
        rows = comm.gather(row)
        if comm.is_root:
            row["iteration_s_max_rank"] = max(r["iteration_s"] for r in rows)
            if astra and not iteration_only:
                row["astra_s_per_slice_angle"] = time_astra(n, angles, repeat)
            result["cases"].append(row)
    return result


def write_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
