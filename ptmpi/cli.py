"""Command line: ``ptmpi simulate | reconstruct | info | demo | paper`` (SPEC section 6).

Every command runs unchanged with one process or under ``mpiexec``/``srun``; only rank 0
prints. Errors a user can fix end the job with one line ``ptmpi <cmd>: error: ...`` and
exit status 1 (2 for bad command-line usage), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ptmpi import __version__
from ptmpi.parallel import SerialComm, get_comm

if TYPE_CHECKING:
    from ptmpi.sim.presets import SimulationSettings

logger = logging.getLogger("ptmpi")


class UserError(Exception):
    """An error the user can fix (bad input, existing output, ...): one line, no traceback."""


def _setup_logging(comm: SerialComm, verbose: bool) -> None:
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

        for handler in logging.getLogger().handlers:
            handler.setFormatter(_RankFormatter("%(message)s"))
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
        "phase_scale": args.phase_scale, "jitter": args.jitter,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.nz is None and args.n is not None and args.preset is None:
        overrides["nz"] = args.n
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _is_demo_file(path: Path) -> bool:
    """True when ``path`` is an HDF5 file an earlier ``ptmpi demo`` wrote."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("ptmpi_demo", False))
    except OSError:
        return False


def simulate_to_file(settings, path: Path, force: bool, demo: bool = False) -> None:
    """Simulate ``settings`` and write the SPEC 3 file ``path`` (with ``truth/``).

    An existing ``path`` is replaced only with ``force``, or when ``demo`` is set and the
    file is one an earlier demo wrote: nothing a user wrote is overwritten silently.
    """
    force = force or (demo and path.exists() and _is_demo_file(path))
    from ptmpi.io.cxi import write_input
    from ptmpi.sim.simulate import simulate

    if path.exists() and not force:
        raise UserError(f"{path}: output exists; pass --force to overwrite it")
    t0 = time.perf_counter()
    data = simulate(settings)
    try:
        write_input(
            path,
            counts=data.counts,
            probe=data.probe,
            positions_px=data.positions_px,
            frame_offset=data.frame_offset,
            angles_deg=data.angles_deg,
            volume_shape=data.volume.shape,
            truth_volume=data.volume,
            truth_probe=data.probe,
            overwrite=force,
            attrs={
                "simulation": json.dumps(settings.to_dict()),
                "snr_intensity_db": data.snr_intensity_db,
            },
            root_attrs={"ptmpi_demo": 1} if demo else None,
        )
    except (FileExistsError, OSError) as exc:
        raise UserError(f"{path}: cannot write ({exc})") from exc
    snr = "noise-free" if math.isinf(data.snr_intensity_db) else (
        f"SNR_intensity {data.snr_intensity_db:.1f} dB")
    logger.info(
        "simulated %s: volume %s, %d angles, %d frames of %dx%d, %s, %.1f s",
        path, data.volume.shape, settings.n_angles, data.counts.shape[0],
        settings.probe_size, settings.probe_size, snr, time.perf_counter() - t0,
    )


def cmd_simulate(args, comm: SerialComm) -> int:
    settings = _settings_from_args(args)
    if comm.is_root:
        simulate_to_file(settings, Path(args.output), args.force)
    comm.barrier()
    return 0


# ---------------------------------------------------------------------------- reconstruct


def cmd_reconstruct(args, comm: SerialComm) -> int:
    import numpy as np

    from ptmpi.reconstruct import RunError, reconstruct, settings_from_args

    try:
        algorithm, settings = settings_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    dtype = np.complex128 if args.double else np.complex64
    try:
        reconstruct(args.input, args.output, settings, comm, algorithm=algorithm,
                    force=args.force, gpu=args.gpu, dtype=dtype,
                    figures=not args.no_figures, command=" ".join(sys.argv))
    except RunError as exc:
        raise UserError(str(exc)) from exc
    return 0


# ---------------------------------------------------------------------------- paper


def cmd_paper(args, comm: SerialComm) -> int:
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
                  methods=methods, force=args.force)
    except RunError as exc:
        raise UserError(str(exc)) from exc
    if comm.is_root:
        print((Path(args.out) / "table.md").read_text())
    return 0


# ---------------------------------------------------------------------------- info


def cmd_info(args, comm: SerialComm) -> int:
    from ptmpi.io.info import main_info

    code = main_info(args.file) if comm.is_root else 0
    return int(comm.bcast(code))


# ---------------------------------------------------------------------------- demo


def cmd_demo(args, comm: SerialComm) -> int:
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
    parser = argparse.ArgumentParser(
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
    p.add_argument("--jitter", type=float, help="uniform scan jitter amplitude (pixels)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("reconstruct", help="reconstruct a volume with APT or APTs")
    p.add_argument("input", help="input HDF5 file (SPEC 3)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (SPEC 4)")
    p.add_argument("--algorithm", choices=["apt", "apts", "two-step", "ptycho2d"],
                   help="apt (default), apts, two-step (per-angle ptychography then "
                        "tomography) or ptycho2d (per-angle ptychography only)")
    p.add_argument("--iterations", type=int,
                   help="ADMM iterations (default 200 for apt/apts, 100 for two-step/ptycho2d)")
    p.add_argument("--tol", type=float,
                   help="stop when the relative change of u falls below this (default: off)")
    p.add_argument("--likelihood", choices=["agm", "ipm"], help="data fidelity (default ipm)")
    p.add_argument("--tv-weight", type=float, help="TV weight lambda (default: from data)")
    p.add_argument("--r1", type=float, help="penalty of p = grad u (default: from data)")
    p.add_argument("--r2", type=float, help="penalty of z = D u (default 0.1)")
    p.add_argument("--cg-iterations", type=int, help="CG iterations per u-step (default 8)")
    p.add_argument("--refine-probe", action="store_true", default=None,
                   help="update the probe every iteration")
    p.add_argument("--tomo-iterations", type=int,
                   help="two-step: CG iterations of the tomography (default 10)")
    p.add_argument("--damping", type=float,
                   help="two-step/ptycho2d: damping of the image update, as a fraction of "
                        "the mean illumination (default 0.1)")
    p.add_argument("--double", action="store_true", help="complex128 instead of complex64")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank (CuPy)")
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("paper", help="reproduce the paper's Tables 1 and 2 and figures")
    p.add_argument("--out", required=True, help="folder for data, reconstructions, tables")
    p.add_argument("--size", type=int, default=128, help="volume size (default 128, paper)")
    p.add_argument("--cases", help="comma-separated subset of the cases (default: all)")
    p.add_argument("--methods", help="comma-separated subset of two-step,apts,apt (default all);"
                                      " earlier results in --out are kept")
    p.add_argument("--iterations", type=int, help="override every method's iterations")
    p.add_argument("--force", action="store_true", help="re-simulate existing data files")
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser("info", help="summarize and validate an input or output file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="simulate a small case and reconstruct it with APT")
    p.add_argument("--iterations", type=int, default=200, help="APT iterations (default 200)")
    p.add_argument("--out", default="ptmpi-demo", help="directory for the demo's files")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.set_defaults(func=cmd_demo)
    return parser


def _error_line(text: str) -> None:
    """Write one line to stderr in a single call, so other ranks' output cannot split it."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        comm = get_comm()
    except RuntimeError as exc:
        _error_line(f"ptmpi: error: {exc}")
        return 1
    _setup_logging(comm, args.verbose)
    try:
        return args.func(args, comm)
    except UserError as exc:
        # Raised alike on every rank that reached it: rank 0 speaks for all.
        if comm.is_root:
            _error_line(f"ptmpi {args.command}: error: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - anything else may be on one rank only
        where = f" on rank {comm.rank}" if comm.size > 1 else ""
        _error_line(f"ptmpi {args.command}: error{where}: {type(exc).__name__}: {exc}")
        if args.verbose:
            raise
        if comm.size > 1:
            comm.abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
