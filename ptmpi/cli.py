"""Command line: ``ptmpi simulate | reconstruct | import | info | demo | paper | bench`` (SPEC 6).

Every command runs unchanged with one process or under ``mpiexec``/``srun``; only rank 0
prints. Errors a user can fix end the job with one line ``ptmpi <cmd>: error: ...`` and
exit status 1 (2 for bad command-line usage), never a traceback. ``reconstruct`` (apt,
apts) stopped by SIGTERM or SIGUSR1 writes a checkpoint and exits with
:data:`EXIT_CHECKPOINTED` (75): resubmit the same command with ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ptmpi import __version__
from ptmpi.errors import UserError
from ptmpi.parallel import Comm, get_comm
from ptmpi.sim.files import is_demo_file as _is_demo_file
from ptmpi.sim.files import simulate_to_file

if TYPE_CHECKING:
    from ptmpi.sim.presets import SimulationSettings

logger = logging.getLogger("ptmpi")

#: Exit status of a ``reconstruct`` stopped by SIGTERM/SIGUSR1 after writing a checkpoint
#: (EX_TEMPFAIL): "checkpointed, run the same command again with --resume".
EXIT_CHECKPOINTED = 75
#: Seconds the ranks wait for each other after an error that all should raise alike.
_ALIKE_TIMEOUT_S = 5.0
#: ``--checkpoint-every`` when ``--checkpoint`` is given without it.
DEFAULT_CHECKPOINT_EVERY = 10


def _launcher_rank() -> int:
    """This process's rank as an MPI or SLURM launcher tells it (0 without a launcher).

    Read from the environment, so that command-line errors can be reported before (and
    without) initializing MPI.
    """
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line from rank 0 only (every rank parses), exit status 2."""

    def error(self, message: str):
        if _launcher_rank() == 0:
            _error_line(f"{self.prog}: error: {message} (see {self.prog} --help)")
        self.exit(2)


def _number(kind: type, low: float, strict: bool = False, below: float | None = None):
    """An argparse type: a finite ``kind`` (int or float) ``>= low`` (``> low`` if strict)
    and, with ``below``, ``< below``."""
    what = f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} {low:g}"
    if below is not None:
        what += f" and < {below:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < low
                or (strict and value == low) or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"expected {what}, found {text!r}")
        return value

    parse.__name__ = what  # argparse names the type with it in some messages
    return parse


_COUNT = _number(int, 0)  # iterations: 0 allowed
_POSITIVE_INT = _number(int, 1)
_NON_NEGATIVE = _number(float, 0.0)
_POSITIVE = _number(float, 0.0, strict=True)
_FRACTION = _number(float, 0.0, below=1.0)


def _finite(text: str) -> float:
    """An argparse type: any finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


def _setup_logging(comm: Comm, verbose: bool) -> None:
    level = logging.INFO if comm.is_root else logging.WARNING
    if verbose and comm.is_root:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if comm.size > 1:
        rank_prefix = f"[rank {comm.rank}] "

        class _RankFormatter(logging.Formatter):
            def format(self, record):
                text = super().format(record)
                return rank_prefix + text if record.levelno >= logging.WARNING else text

        from ptmpi.progress import is_replicated

        for handler in logging.getLogger().handlers:
            handler.setFormatter(_RankFormatter("%(message)s"))
            if not comm.is_root:  # what every rank logs alike is shown once, by rank 0
                handler.addFilter(lambda record: not is_replicated(record))
    # A warning is one line for the user, not the source line that raised it.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}"
    logging.captureWarnings(True)
    if comm.size > 1:
        # Warnings carry the rank; only rank 0 shows those all ranks would repeat.
        warnings.simplefilter("default" if comm.is_root else "ignore")


# ---------------------------------------------------------------------------- simulate


def _settings_from_args(args) -> SimulationSettings:
    from ptmpi.sim.presets import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        raise UserError(
            f"unknown preset {args.preset!r}; expected one of: {', '.join(sorted(PRESETS))}"
        )
    base = PRESETS[args.preset or "paper-s32-a12"]
    overrides = {
        "n": args.n, "nz": args.nz, "n_angles": args.angles, "step": args.step,
        "probe_size": args.probe_size, "fwhm": args.fwhm, "eta": args.eta, "seed": args.seed,
        "phase_scale": args.phase_scale, "jitter": args.jitter, "scan": args.scan,
        "mask_stripe": args.mask_stripe, "hot_pixels": args.hot_pixels,
        "model": args.model, "max_phase": args.max_phase,
        "drift": args.drift, "probe_defocus": args.probe_defocus,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.nz is None and args.n is not None and args.preset is None:
        overrides["nz"] = args.n
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def cmd_simulate(args, comm: Comm) -> int:
    settings = _settings_from_args(args)

    def work():
        simulate_to_file(settings, Path(args.output), args.force,
                         export_cxi=Path(args.export_cxi) if args.export_cxi else None)

    _on_root(comm, work, UserError)
    return 0


def _on_root(comm: Comm, work, failures) -> None:
    """Run ``work()`` on rank 0 alone; a ``failures`` exception there ends every rank alike
    with one UserError (the others would wait in their next collective otherwise)."""
    failure = None
    if comm.is_root:
        try:
            work()
        except failures as exc:
            failure = str(exc)
    failure = comm.bcast(failure)
    if failure:
        raise UserError(failure)


# ---------------------------------------------------------------------------- import


def cmd_import(args, comm: Comm) -> int:
    """Per-angle CXI files (SPEC 8) into one SPEC 3 file; rank 0 works, the others wait."""
    from ptmpi.io.importer import ImportFailure, import_cxi
    from ptmpi.io.per_angle import Conventions

    angles = None
    if args.angles_deg is not None:
        try:
            angles = [float(v) for v in args.angles_deg.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--angles-deg takes comma-separated numbers, got "
                            f"{args.angles_deg!r}") from None

    def work():
        summary = import_cxi(
            args.files, args.output, volume_shape=args.volume_shape, probe=args.probe,
            angles_deg=angles, angle_dataset=args.angle_dataset,
            conventions=Conventions(args.flip_x, args.flip_y, args.axis_offset),
            overwrite=args.force, command=" ".join(sys.argv),
        )
        mask = "no mask" if summary.mask_shape is None else f"mask {summary.mask_shape}"
        logger.info("imported %d file(s) into %s: volume %s, %d frames of %dx%d, object "
                    "pixel %.4g m, %s", summary.n_angles, summary.output,
                    summary.volume_shape, summary.n_frames, summary.m, summary.m,
                    summary.object_pixel_size, mask)

    _on_root(comm, work, ImportFailure)
    return 0


# ---------------------------------------------------------------------------- reconstruct


def _dry_run(args, algorithm, settings, dtype, comm: Comm) -> int:
    """``reconstruct --dry-run``: validate, print the memory plan, solve nothing."""
    import numpy as np

    from ptmpi.memory import format_bytes
    from ptmpi.reconstruct import RunError, reconstruct

    try:
        plan = reconstruct(args.input, args.output, settings, comm, algorithm=algorithm,
                           force=args.force, gpu=args.gpu, dtype=dtype, dry_run=True,
                           slabs=getattr(args, "slabs", "auto"))
    except RunError as exc:
        raise UserError(str(exc)) from exc
    if comm.is_root:
        arrays = plan["arrays"]
        print(f"dry run: {algorithm} on {comm.size} rank(s), {np.dtype(dtype).name}: the input and "
              "output are valid")
        print(f"dry run: {plan['layout']}" + (
            f", projection transposes {format_bytes(arrays['transposes'])} per rank"
            if plan.get("slabs", 1) > 1 else ""))
        if plan.get("gpu"):
            print(f"dry run: GPU memory per rank up to "
                  f"{format_bytes(plan['device_bytes_per_rank_max'])} (solver arrays "
                  f"{format_bytes(arrays['solver'])}, projector "
                  f"{format_bytes(arrays['projector'])}; not checked against the GPU's)")
            print(f"dry run: host memory per rank up to "
                  f"{format_bytes(plan['bytes_per_rank_max'])} (input "
                  f"{format_bytes(arrays['input'])}, plus the process itself: "
                  f"{format_bytes(plan['runtime'])} for the first solve and its size now)")
        else:
            print(f"dry run: memory per rank up to {format_bytes(plan['bytes_per_rank_max'])} "
                  f"(solver arrays {format_bytes(arrays['solver'])}, projector "
                  f"{format_bytes(arrays['projector'])}, input {format_bytes(arrays['input'])}, "
                  f"plus the process itself: {format_bytes(plan['runtime'])} for the first "
                  "solve and its size now)")
        available = plan["bytes_available"]
        print(f"dry run: {format_bytes(plan['bytes_node'])} for the ranks on this node, "
              f"{format_bytes(available) if available else 'unknown'} available: it fits")
    return 0


def settings_from_args(args, model: str = "linear"):
    """Solver settings from the ``reconstruct`` flags (unset flags keep the defaults)."""
    from ptmpi.solvers.admm import SolverSettings
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings

    algorithm = args.algorithm or "apt"
    modes = getattr(args, "probe_modes", None)
    if model != "exp" and getattr(args, "support", None) is not None:
        raise ValueError("--support applies to --model exp only (the linear model has no "
                         "empty-space value of u)")
    if model == "exp" and getattr(args, "start", None) in ("coarse", "two-step"):
        raise ValueError(f"--start {args.start} applies to the linear model only; --model "
                         "exp starts from per-angle ptychography and a phase-gradient "
                         "tomography")
    if getattr(args, "align", None) and getattr(args, "start", None) in ("coarse",
                                                                         "two-step"):
        raise ValueError(f"--start {args.start} is not combined with --align yet (the "
                         "restart from the aligned positions starts from u = 1): drop one")
    if getattr(args, "tv_continuation", None) is not None and (
            model == "exp" or algorithm != "apt"):
        raise ValueError("--tv-continuation applies to APT with the linear model only")
    if model != "exp" and getattr(args, "cg_tol", None) is not None:
        raise ValueError("--cg-tol applies to --model exp only (the linear u-step takes "
                         "--cg-iterations warm-started CG steps)")
    if model == "exp":
        from ptmpi.solvers.admm_exp import ExpSolverSettings

        if algorithm == "ptycho2d":
            raise ValueError("--algorithm ptycho2d does not use a tomography model: drop "
                             "--model exp")
        fields = {
            "algorithm": algorithm, "iterations": args.iterations, "tol": args.tol,
            "likelihood": args.likelihood, "tv_weight": args.tv_weight, "r1": args.r1,
            "r2": args.r2, "cg_iterations": args.cg_iterations,
            "cg_tol": getattr(args, "cg_tol", None), "support": getattr(args, "support", None),
            "refine_probe": args.refine_probe, "epsilon": getattr(args, "epsilon", None),
            "init_gn_iterations": getattr(args, "tomo_iterations", None),
            "adapt_penalties": {"on": True, "off": False}.get(getattr(args, "adapt_r2", None)),
            **_align_fields(args, algorithm),
            "probe_modes": modes,
        }
        if algorithm == "two-step":  # the initialisation alone
            fields.update(iterations=1, init_iterations=args.iterations,
                          init_gn_iterations=args.tomo_iterations)
        return algorithm, dataclasses.replace(ExpSolverSettings(), **{
            k: v for k, v in fields.items() if v is not None})
    if algorithm in ("apt", "apts"):
        fields = {
            "algorithm": algorithm, "iterations": args.iterations, "tol": args.tol,
            "likelihood": args.likelihood, "tv_weight": args.tv_weight, "r1": args.r1,
            "r2": args.r2, "cg_iterations": args.cg_iterations,
            "refine_probe": args.refine_probe, "epsilon": getattr(args, "epsilon", None),
            "adapt_r2": {"on": True, "off": False}.get(getattr(args, "adapt_r2", None)),
            "start": getattr(args, "start", None),
            "start_iterations": getattr(args, "start_iterations", None),
            "tv_continuation": getattr(args, "tv_continuation", None),
            **_align_fields(args, algorithm),
            "probe_modes": modes,
        }
        base = SolverSettings()
    else:
        fields = {
            "iterations": args.iterations, "likelihood": args.likelihood, "r2": args.r2,
            "refine_probe": args.refine_probe, "tomo_iterations": args.tomo_iterations,
            "damping": args.damping, "epsilon": getattr(args, "epsilon", None),
            "adapt_r2": {"on": True, "off": False}.get(getattr(args, "adapt_r2", None)),
            "probe_modes": modes,
        }
        _align_fields(args, algorithm)
        base = Ptycho2DSettings()
    return algorithm, dataclasses.replace(base, **{k: v for k, v in fields.items()
                                                   if v is not None})


def _align_fields(args, algorithm: str) -> dict:
    """The ``--align*`` flags as solver settings (apt and apts only)."""
    fields = {"align": getattr(args, "align", None),
              "align_every": getattr(args, "align_every", None),
              "align_start": getattr(args, "align_start", None),
              "align_max": getattr(args, "align_max", None),
              "align_gauge": getattr(args, "align_gauge", None)}
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields and algorithm not in ("apt", "apts"):
        raise ValueError(f"--align refines shifts inside the joint iterations: it needs "
                         f"--algorithm apt or apts, not {algorithm}")
    if fields and not fields.get("align"):
        raise ValueError("--align-every, --align-start, --align-max and --align-gauge need "
                         "--align")
    return fields


def _slabs_arg(text: str):
    """``--slabs``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}")
    return value


def cmd_reconstruct(args, comm: Comm) -> int:
    import contextlib

    import numpy as np

    from ptmpi.reconstruct import RunError, input_model, reconstruct
    from ptmpi.restart import Interrupted, stop_on_signals

    model = args.model
    if model is None and args.algorithm != "ptycho2d":  # ptycho2d has no volume model
        model = comm.bcast(input_model(args.input) if comm.is_root else None)
    model = model or "linear"
    try:
        algorithm, settings = settings_from_args(args, model)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    dtype = np.complex128 if args.double else np.complex64
    if args.dry_run:
        return _dry_run(args, algorithm, settings, dtype, comm)
    every = args.checkpoint_every
    if every is None:
        every = DEFAULT_CHECKPOINT_EVERY if args.checkpoint else 0
    # Stop signals become checkpoints only where they can (apt/apts); elsewhere they keep
    # their default action (end the process).
    joint = algorithm in ("apt", "apts")
    with (stop_on_signals() if joint else contextlib.nullcontext()) as stop_request:
        try:
            reconstruct(args.input, args.output, settings, comm, algorithm=algorithm,
                        force=args.force, gpu=args.gpu, dtype=dtype,
                        figures=not args.no_figures, command=" ".join(sys.argv),
                        checkpoint=args.checkpoint, checkpoint_every=every,
                        resume=args.resume, stop_request=stop_request,
                        slabs=getattr(args, "slabs", "auto"))
        except RunError as exc:
            raise UserError(str(exc)) from exc
        except Interrupted as exc:  # raised alike on every rank
            if comm.is_root:
                _error_line(f"ptmpi reconstruct: {exc} (exit status {EXIT_CHECKPOINTED})")
            return EXIT_CHECKPOINTED
    return 0


# ---------------------------------------------------------------------------- paper


def cmd_paper(args, comm: Comm) -> int:
    from ptmpi.paper import CASES, run_paper
    from ptmpi.reconstruct import RunError

    names = [c[0] for c in CASES]
    chosen = args.cases.split(",") if args.cases else None
    if chosen and any(c not in names for c in chosen):
        raise UserError(f"unknown case in --cases {args.cases!r}; expected some of {names}")
    if args.size < 32 or args.size % 8:
        raise UserError(f"--size must be a multiple of 8 and at least 32, got {args.size}")
    try:
        methods = args.methods.split(",") if args.methods else None
        if methods and any(m not in ("two-step", "apts", "apt") for m in methods):
            raise UserError(f"unknown method in --methods {args.methods!r}; expected some of "
                            "two-step, apts, apt")
        run_paper(Path(args.out), args.size, comm, iterations=args.iterations, cases=chosen,
                  methods=methods, force=args.force, gpu=args.gpu)
    except RunError as exc:
        raise UserError(str(exc)) from exc
    if comm.is_root:
        print((Path(args.out) / "table.md").read_text())
    return 0


# ---------------------------------------------------------------------------- bench


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def _bench_to_snr(args, comm: Comm, sizes, xp) -> int:
    """``ptmpi bench --to-snr DB`` (:mod:`ptmpi.bench.convergence`)."""
    import numpy as np

    from ptmpi.bench import BenchCase, write_json
    from ptmpi.bench.convergence import STARTS, format_to_snr, time_to_snr

    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if not starts or any(s not in STARTS for s in starts):
        raise UserError(f"--starts must list some of {', '.join(STARTS)}, got {args.starts!r}")
    if args.slabs < 1 or comm.size % args.slabs:
        raise UserError(f"--slabs {args.slabs}: must divide the rank count ({comm.size})")
    if args.algorithm != "apt":
        raise UserError("--to-snr times APT (--algorithm apt)")
    results = []
    for n in sizes:
        result = time_to_snr(BenchCase(n=n, angles=args.angles, step=args.step),
                             args.to_snr, starts, args.repeat, comm, xp=xp,
                             dtype=np.complex128 if args.double else np.complex64,
                             slabs=args.slabs, max_iterations=args.max_iterations)
        results.append(result)
        if comm.is_root:
            print(format_to_snr(result))
    if comm.is_root and args.json:
        write_json({"to_snr": results}, args.json)
    return 0


def cmd_bench(args, comm: Comm) -> int:
    import numpy as np

    from ptmpi.backend import get_array_module, select_device
    from ptmpi.bench import run_bench, write_json
    from ptmpi.bench.report import format_result, format_scaling

    if args.repeat < 1:
        raise UserError(f"--repeat must be >= 1, got {args.repeat}")
    if args.model:
        from ptmpi.bench.model import GIB, evaluate, format_model

        if comm.is_root:
            for limit in (80 * GIB, 256 * GIB):
                print(format_model(evaluate(limit_bytes=limit), limit))
        return 0
    if args.scaling:
        from ptmpi.bench.scaling import run_scaling

        if comm.size > 1:
            raise UserError("bench --scaling starts its own MPI jobs: run it as one process")
        try:
            result = run_scaling(args.scaling_size, args.scaling_angles, args.weak_angles,
                                 _int_list(args.ranks, "--ranks"), args.repeat)
        except RuntimeError as exc:
            raise UserError(str(exc)) from exc
        print(format_scaling(result))
    else:
        sizes = _int_list(args.sizes, "--sizes")
        if any(n % 8 or n < 32 for n in sizes) or args.angles < comm.size:
            raise UserError("--sizes must be multiples of 8 (>= 32) and --angles >= ranks")
        try:
            xp = get_array_module(args.gpu)
        except RuntimeError as exc:
            raise UserError(str(exc)) from exc
        if args.gpu:
            select_device(comm.local_rank)
        if args.to_snr is not None:
            return _bench_to_snr(args, comm, sizes, xp)
        if args.slabs < 1 or comm.size % args.slabs or (args.slabs > 1 and (
                not args.iteration_only or args.gpu)):
            raise UserError(f"--slabs {args.slabs}: must divide the rank count ({comm.size}); "
                            "above 1 only with --iteration-only, on CPUs")
        result = run_bench(sizes, args.angles, args.step, args.repeat, comm, xp=xp,
                           dtype=np.complex128 if args.double else np.complex64,
                           algorithm=args.algorithm, astra=not args.no_astra,
                           iteration_only=args.iteration_only, slabs=args.slabs)
        if comm.is_root and not args.iteration_only:
            print(format_result(result))
    if comm.is_root and args.json:
        write_json(result, args.json)
    return 0


# ---------------------------------------------------------------------------- info


def cmd_info(args, comm: Comm) -> int:
    from ptmpi.io.info import main_info

    code = main_info(args.file) if comm.is_root else 0
    return int(comm.bcast(code))


# ---------------------------------------------------------------------------- demo


def cmd_demo(args, comm: Comm) -> int:
    """Simulate the ``demo`` preset, reconstruct it with APT, report SNR and R-factor."""
    import numpy as np

    from ptmpi.metrics import snr_db
    from ptmpi.reconstruct import RunError, reconstruct
    from ptmpi.sim.presets import PRESETS
    from ptmpi.solvers.admm import SolverSettings

    out = Path(args.out)
    data_path, rec_path = out / "demo.h5", out / "demo-apt.h5"
    failure = None
    if comm.is_root:
        try:
            out.mkdir(parents=True, exist_ok=True)
            simulate_to_file(PRESETS["demo"], data_path, args.force, demo=True)
            if rec_path.exists() and not (args.force or _is_demo_file(rec_path)):
                raise UserError(f"{rec_path}: output exists; pass --force to overwrite it")
        except (UserError, OSError) as exc:
            failure = str(exc)
    failure = comm.bcast(failure)
    if failure:
        raise UserError(failure)
    settings = SolverSettings(iterations=args.iterations)
    try:
        summary = reconstruct(str(data_path), str(rec_path), settings, comm, force=True,
                              command=" ".join(sys.argv), demo=True)
    except RunError as exc:
        raise UserError(str(exc)) from exc
    if comm.is_root:
        import h5py

        with h5py.File(data_path, "r") as f:
            truth = f["entry_1/ptmpi/truth/volume"][...]
        trivial = snr_db(np.ones_like(truth), truth)
        print(f"demo: APT on {comm.size} rank(s), {summary['iterations']} iterations in "
              f"{summary['wall_s']:.1f} s")
        print(f"demo: SNR {summary['snr_db']:.2f} dB (empty-sample guess u = 1: "
              f"{trivial:.2f} dB), R-factor {summary['r_factor']:.4f}")
        print(f"demo: wrote {rec_path} and PNG figures beside it")
    return 0


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ptmpi",
        description="Joint ptychography-tomography reconstruction (APT/APTs), MPI-distributed.",
    )
    parser.add_argument("--version", action="version", version=f"ptmpi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a ptycho-tomography dataset (SPEC 3 file)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file")
    p.add_argument("--preset", help="named case (paper-s32-a12, ..., demo); flags override it")
    p.add_argument("--n", type=int, help="volume width n (slices are n x n)")
    p.add_argument("--nz", type=int, help="volume height nz along the rotation axis")
    p.add_argument("--angles", type=int, help="A angles k*180/A degrees, k = 0..A-1")
    p.add_argument("--step", type=int, help="grid scan step in pixels")
    p.add_argument("--probe-size", type=int, help="probe window M (pixels)")
    p.add_argument("--fwhm", type=float, help="probe amplitude FWHM (pixels)")
    p.add_argument("--eta", type=float, help="Poisson photon scale; omit for noise-free data")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--phase-scale", type=float, help="radians of phase per unit phantom value")
    p.add_argument("--jitter", type=float,
                   help="uniform scan jitter half-width (pixels, sub-pixel: not rounded)")
    p.add_argument("--scan", choices=["grid", "spiral"],
                   help="scan pattern: grid (default) or Fermat spiral (--step = mean "
                        "spacing; a new random rotation and offset at every angle)")
    p.add_argument("--export-cxi", metavar="DIR",
                   help="also write the data as per-angle CXI files DIR/angle-000.cxi, ... "
                        "(SPEC 8; the input of ptmpi import)")
    p.add_argument("--drift", type=float, metavar="PX",
                   help="sample drift: a random shift of up to PX pixels (row, col) per angle "
                        "in the data, not in the recorded positions (truth/shifts_px); the "
                        "probe is then zero on its last row and column (the guard band of "
                        "--align)")
    p.add_argument("--probe-defocus", type=float, metavar="RAD",
                   help="store a wrong probe guess: the true probe defocused by RAD radians "
                        "of quadratic phase at the edge of its Fourier grid (truth/probe is "
                        "the true one)")
    p.add_argument("--mask-stripe", type=int, metavar="W",
                   help="W dead detector columns beside the centre (counts 0), masked")
    p.add_argument("--hot-pixels", type=int, metavar="K",
                   help="K random hot detector pixels (counts 4e9), masked")
    p.add_argument("--model", choices=["linear", "exp"],
                   help="forward model: linear (the paper's, default) or exp (t = exp(i P u), "
                        "SPEC 8); recorded in the file")
    p.add_argument("--max-phase", type=_POSITIVE, metavar="RAD",
                   help="exp model: largest projected phase in radians (default 3 pi)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("import", help="per-angle CXI files (SPEC 8) into one input file")
    p.add_argument("files", nargs="+", metavar="FILE", help="one CXI file per angle")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (SPEC 3)")
    p.add_argument("--volume-shape", type=_POSITIVE_INT, nargs=3, metavar=("NZ", "N", "N"),
                   help="volume shape (default: the smallest holding every window whole)")
    p.add_argument("--probe", metavar="FILE",
                   help="probe guess (.npy, or HDF5 with source_1/illumination, source_1/probe "
                        "or image_2/data); default: the first file's illumination")
    p.add_argument("--angles-deg", metavar="LIST",
                   help="comma-separated angles in degrees, one per file, instead of the files' "
                        "(write --angles-deg=-30,... when the first is negative)")
    p.add_argument("--angle-dataset", default="/entry_1/ptychodus/tomography_angle_deg",
                   metavar="PATH", help="dataset holding each file's angle in degrees "
                                        "(default %(default)s)")
    p.add_argument("--flip-x", action="store_true", help="negate the x translations")
    p.add_argument("--flip-y", action="store_true", help="negate the y translations")
    p.add_argument("--axis-offset", type=_finite, default=0.0, metavar="PX",
                   help="the rotation axis passes through x = PX object pixels (after "
                        "--flip-x), not x = 0 (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("reconstruct", help="reconstruct a volume with APT or APTs")
    p.add_argument("input", help="input HDF5 file (SPEC 3)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (SPEC 4)")
    p.add_argument("--algorithm", choices=["apt", "apts", "two-step", "ptycho2d"],
                   help="apt (default), apts, two-step (per-angle ptychography then "
                        "tomography) or ptycho2d (per-angle ptychography only)")
    p.add_argument("--model", choices=["linear", "exp"],
                   help="forward model: linear (the paper's) or exp (t = exp(i P u), SPEC 8); "
                        "default: what the input file records, else linear")
    p.add_argument("--iterations", type=_POSITIVE_INT,
                   help="ADMM iterations, an upper bound: runs stop on convergence (--tol) "
                        "(default 1000 for apt/apts, 200 with --model exp, 100 for "
                        "two-step/ptycho2d)")
    p.add_argument("--tol", type=_NON_NEGATIVE,
                   help="stop when the relative change of u has stayed below this for 5 "
                        "iterations (default 1e-4; 0: run all --iterations)")
    p.add_argument("--likelihood", choices=["agm", "ipm"], help="data fidelity (default ipm)")
    p.add_argument("--tv-weight", type=_NON_NEGATIVE, help="TV weight lambda (default: from data)")
    p.add_argument("--r1", type=_NON_NEGATIVE, help="penalty of p = grad u (default: from data)")
    p.add_argument("--r2", type=_POSITIVE,
                   help="penalty of z = D u (default APT/APTs: min(0.1, 20 d / L, 4.8 / n) "
                        "from the data, d and L the mean diagonal and norm of D^H D (exp: "
                        "of sum P^H W P), n the volume's width; ptycho2d: 0.1)")
    p.add_argument("--adapt-r2", choices=["auto", "on", "off"],
                   help="raise r2 when the iterates cycle (default auto: on for photon "
                        "counts; on noise-free data only in the final phase of the TV "
                        "continuation; two-step/ptycho2d: on; --model exp: r2, rho and r1 "
                        "raised together, on unless off)")
    p.add_argument("--tv-continuation", choices=["auto", "on", "off"],
                   help="APT, linear model: lower the TV weight from iteration 100 by 1%% "
                        "per iteration down to max(0.1 tv_weight, 1e-3 d), then let r2 "
                        "adapt from half the iterations (default auto: on for noise-free "
                        "data with the default TV weight)")
    p.add_argument("--epsilon", type=_NON_NEGATIVE,
                   help="smoothing of the likelihood, in counts per pixel (default 10 for "
                        "photon counts, 0 for noise-free data; two-step/ptycho2d: 0)")
    p.add_argument("--cg-iterations", type=_POSITIVE_INT,
                   help="CG iterations per u-step (default 8; --model exp: at least this "
                        "many, see --cg-tol)")
    p.add_argument("--cg-tol", type=_FRACTION,
                   help="--model exp: after --cg-iterations, continue CG until its residual "
                        "is this fraction of the right-hand side, up to 64 iterations "
                        "(default 0: exactly --cg-iterations; 0.2 helps where the joint "
                        "R-factor stalls far above the initialisation's, see docs/exp-model.md)")
    p.add_argument("--support", choices=["fov", "none"],
                   help="--model exp: fov (default) keeps u = 0, empty space, on the voxels "
                        "that some angle misses entirely (outside the field of view, about "
                        "the inscribed cylinder); none lets every voxel take a value")
    p.add_argument("--start", choices=["ones", "coarse", "two-step"],
                   help="apt/apts starting point: ones (the paper's u = 1), coarse "
                        "(solve at half the size first, then interpolate) or two-step (the "
                        "2-step result: per-angle ptychography, then tomography)")
    p.add_argument("--start-iterations", type=_COUNT,
                   help="--start coarse: iterations at half the size; two-step: per-angle "
                        "ptychography iterations (default 100)")
    p.add_argument("--refine-probe", action="store_true", default=None,
                   help="update the probe every iteration")
    p.add_argument("--align", action="store_true", default=None,
                   help="refine a (row, col) shift per angle inside the joint iterations "
                        "(sample drift); written to /entry_1/ptmpi/shifts_px. Restarts "
                        "from the aligned positions run up to 2x --iterations (exp model: "
                        "3x, its final pass; linear model: 3x when an outlying angle, "
                        "re-fitted against a volume of 100 iterations without its own "
                        "data, moves)")
    p.add_argument("--align-every", type=_POSITIVE_INT, metavar="N",
                   help="--align: iterations between shift updates (default 3)")
    p.add_argument("--align-start", type=_COUNT, metavar="K",
                   help="--align: iteration of the first shift update (default 2)")
    p.add_argument("--align-max", type=_POSITIVE, metavar="PX",
                   help="--align: largest shift per axis; a shift reaching it stops there "
                        "with a warning (default: half the probe width)")
    p.add_argument("--align-gauge", choices=["volume", "zero"],
                   help="--align: the translations of the volume that the data cannot see "
                        "(a common row shift, a column shift a cos + b sin) stay with the "
                        "current volume (volume, default) or are removed from the shifts "
                        "after every update (zero)")
    p.add_argument("--tomo-iterations", type=_COUNT,
                   help="two-step: CG iterations of the tomography (default 10); --model "
                        "exp: Gauss-Newton steps of the initialisation's phase-gradient "
                        "tomography (default 20 per 32 voxels of the volume's width, at "
                        "least 20)")
    p.add_argument("--damping", type=_POSITIVE,
                   help="two-step/ptycho2d: damping of the image update, as a fraction of "
                        "the mean illumination (default 0.1)")
    p.add_argument("--probe-modes", type=_POSITIVE_INT, metavar="K",
                   help="K incoherent probe modes (mixed-state ptychography; default 1, "
                        "the coherent probe); --refine-probe refines them all")
    p.add_argument("--double", action="store_true", help="complex128 instead of complex64")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the input and output, print the memory each rank needs, "
                        "and stop (also refused there when it would not fit the node)")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank (CuPy)")
    p.add_argument("--slabs", type=_slabs_arg, default="auto", metavar="S|auto",
                   help="apt/apts: split the ranks into ranks/S angle groups and S z-slabs of "
                        "the volume (S divides the rank count; 1: every rank holds the whole "
                        "volume). auto (default): on CPUs one slab per rank of a node, with "
                        "--gpu 1, when that fits the node's memory, else more slabs; the "
                        "layout is printed")
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="apt/apts only: the checkpoint file, the full solver state (default "
                        "<output stem>-checkpoint.h5, e.g. rec-checkpoint.h5). SIGTERM or "
                        f"SIGUSR1 write it and end the run with exit status {EXIT_CHECKPOINTED}")
    p.add_argument("--checkpoint-every", type=_COUNT, metavar="K",
                   help="write the checkpoint every K iterations and after the last (default "
                        f"{DEFAULT_CHECKPOINT_EVERY} with --checkpoint, else 0: only on "
                        "SIGTERM/SIGUSR1)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint up to --iterations (any rank count); "
                        "when there is no checkpoint yet, start from iteration 0, so a job "
                        "script can always pass it. Refused: a checkpoint of another input "
                        "or configuration (only --iterations and --tol may change)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output file (and, without --resume, an "
                        "existing checkpoint)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("paper", help="reproduce the paper's Tables 1 and 2 and figures")
    p.add_argument("--out", required=True, help="folder for data, reconstructions, tables")
    p.add_argument("--size", type=int, default=128, help="volume size (default 128, paper)")
    p.add_argument("--cases", help="comma-separated subset of the cases (default: all)")
    p.add_argument("--methods", help="comma-separated subset of two-step,apts,apt (default all);"
                                      " earlier results in --out are kept")
    p.add_argument("--iterations", type=_POSITIVE_INT,
                   help="override every method's iterations")
    p.add_argument("--gpu", action="store_true",
                   help="reconstruct on one GPU per rank (CuPy), as reconstruct --gpu")
    p.add_argument("--force", action="store_true",
                   help="re-simulate existing data files; replace files in --out that ptmpi "
                        "did not write")
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser("bench", help="time operators and APT iterations against this "
                                      "machine's floors (runs under mpiexec)")
    p.add_argument("--sizes", default="64,128", help="volume sizes n (default 64,128)")
    p.add_argument("--angles", type=int, default=12, help="rotation angles (default 12)")
    p.add_argument("--step", type=int, help="scan step (default n/4, the paper's 32 at 128)")
    p.add_argument("--algorithm", choices=["apt", "apts"], default="apt")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure (default 5)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-astra", action="store_true", help="skip the ASTRA comparison")
    p.add_argument("--iteration-only", action="store_true",
                   help="time only the iteration (used by --scaling)")
    p.add_argument("--slabs", type=int, default=1,
                   help="z-slabs of the angle x slab grid (with --iteration-only or --to-snr; "
                        "default 1)")
    p.add_argument("--scaling", action="store_true",
                   help="strong and weak scaling over --ranks, replicated (--slabs 1) and "
                        "one slab per rank (--slabs P) (run as one process)")
    p.add_argument("--model", action="store_true",
                   help="print the per-rank memory and communication model of the angle and "
                        "angle x z-slab layouts (1024^3 and 2048^3, 1500 angles, 64-4096 "
                        "ranks; arithmetic only)")
    p.add_argument("--ranks", default="1,2,4", help="rank counts of --scaling (default 1,2,4)")
    p.add_argument("--scaling-size", type=int, default=64, help="--scaling size (default 64)")
    p.add_argument("--scaling-angles", type=int, default=48,
                   help="angles of the strong-scaling case (default 48)")
    p.add_argument("--weak-angles", type=int, default=12,
                   help="angles per rank of the weak-scaling case (default 12)")
    p.add_argument("--to-snr", type=float, metavar="DB",
                   help="instead: iterations and wall time for APT (reconstruct's defaults) "
                        "to reach this SNR on the noise-free case of each size, per start")
    p.add_argument("--starts", default="ones,two-step",
                   help="--to-snr: the starts to time (default ones,two-step)")
    p.add_argument("--max-iterations", type=_POSITIVE_INT, default=1000,
                   help="--to-snr: give up after this many iterations (default 1000)")
    p.add_argument("--double", action="store_true", help="complex128 instead of complex64")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank (CuPy)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="summarize and validate an input or output file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="simulate a small case and reconstruct it with APT")
    p.add_argument("--iterations", type=_POSITIVE_INT, default=200,
                   help="APT iterations (default 200)")
    p.add_argument("--out", default="ptmpi-demo", help="directory for the demo's files")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.set_defaults(func=cmd_demo)
    return parser


def _error_line(text: str) -> None:
    """Write one line to stderr in a single call, so other ranks' output cannot split it."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        comm = get_comm()
    except RuntimeError as exc:
        if _launcher_rank() == 0:  # every rank fails alike here
            _error_line(f"ptmpi: error: {exc}")
        return 1
    _setup_logging(comm, args.verbose)
    from ptmpi.operators.fft import set_workers

    set_workers(comm.local_size)
    try:
        return args.func(args, comm)
    except UserError as exc:
        # Raised alike on every rank (checks agree collectively): rank 0 speaks for all.
        if comm.is_root:
            _error_line(f"ptmpi {args.command}: error: {exc}")
        if not comm.reached_by_all(timeout=_ALIKE_TIMEOUT_S):
            # Not raised alike after all: some rank waits in a collective elsewhere.
            if not comm.is_root:
                _error_line(f"ptmpi {args.command}: error on rank {comm.rank}: {exc}")
            comm.abort(1)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else may be on one rank only
        # The other ranks may be waiting in a collective: end the whole job (abort).
        where = f" on rank {comm.rank}" if comm.size > 1 else ""
        text = " ".join(str(exc).split())  # some messages (h5py's) span lines
        _error_line(f"ptmpi {args.command}: error{where}: {type(exc).__name__}: {text}")
        if args.verbose and comm.size == 1:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        if comm.size > 1:
            comm.abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
