"""``ptmpi paper``: reproduce Tables 1 and 2 of the paper (2-step, APTs, APT) and its figures.

Every case of the paper's tables is simulated at the paper's geometry scaled to
``size^3`` (probe ``size/2``, FWHM ``14 size / 128``, steps ``32 size / 128`` and
``4 size / 128``; eta unchanged), then reconstructed by each method with its defaults on
all ranks of the job. Writes ``DIR/table.md``, ``DIR/table.json``, one slices figure per
case (like the paper's Figs. 2, 3 and 5) and convergence curves (like Fig. 4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np

from ptmpi.parallel import Comm

logger = logging.getLogger(__name__)

# (case, paper preset, methods, paper's SNR/R per method; None = "failed")
CASES = [
    ("s32-a12", "paper-s32-a12", {"two-step": None, "apts": (15.1, 0.0295),
                                  "apt": (24.1, 0.0270)}),
    ("s32-a48", "paper-s32-a48", {"two-step": None, "apts": (17.0, 0.0263),
                                  "apt": (25.6, 0.0189)}),
    ("s4-a12", "paper-s4-a12", {"two-step": (16.8, 0.0185), "apts": (17.6, 0.00995),
                                "apt": (26.9, 0.00852)}),
    ("s32-a12-eta1", "paper-s32-a12-eta1", {"apts": (14.9, 0.0455), "apt": (22.7, 0.0427)}),
    ("s32-a12-eta0.1", "paper-s32-a12-eta0.1", {"apts": (13.6, 0.0796),
                                                "apt": (19.4, 0.0732)}),
]
METHOD_LABEL = {"two-step": "2-step", "apts": "APTs", "apt": "APT"}


def scaled_settings(preset: str, size: int):
    """The paper preset scaled from 128^3 to ``size^3`` (same ratios)."""
    from ptmpi.sim.presets import PRESETS

    base = PRESETS[preset]
    k = size / base.n
    return dataclasses.replace(base, n=size, nz=size, probe_size=int(round(base.probe_size * k)),
                               fwhm=base.fwhm * k, step=max(1, int(round(base.step * k))))


def _previous_results(out: Path, size: int) -> list:
    """Rows of an earlier run into the same folder at the same size (kept unless redone)."""
    path = out / "table.json"
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
        return previous.get("results", []) if previous.get("size") == size else []
    except (ValueError, AttributeError, UnicodeDecodeError):  # not a table (--force given)
        return []


def _refusal(out: Path, size: int, selected, methods, force: bool) -> str | None:
    """Why ``run_paper`` must not write into ``out`` (None: it may).

    ``out`` may hold an earlier run's files (data, reconstructions, tables), which are
    reused or replaced; anything else under those names is a user's file.
    """
    import h5py

    if out.exists() and not out.is_dir():
        return f"{out}: expected a folder for --out, found a file"

    def ptmpi_file(path: Path, kind: str) -> bool:
        try:
            with h5py.File(path, "r") as f:
                if kind == "output":
                    return "entry_1/process_1/program" in f
                return "entry_1/ptmpi/volume_shape" in f
        except OSError:
            return False

    targets = [(out / f"{case}-{m}.h5", "output") for case, _, case_methods in selected
               for m in case_methods if methods is None or m in methods]
    targets += [(out / f"{case}.h5", "input") for case, _, _ in selected]
    for path, kind in targets:
        if path.exists() and not ptmpi_file(path, kind) and not force:
            return (f"{path}: exists and is not a ptmpi {kind} file; pass --force to "
                    "overwrite it, or choose another --out")
        if kind == "input" and path.exists() and not force:
            with h5py.File(path, "r") as f:
                found = tuple(int(v) for v in f["entry_1/ptmpi/volume_shape"][()])
            if found != (size,) * 3:
                return (f"{path}: expected a {size}^3 case for --size {size}, found volume "
                        f"{found}; pass --force to re-simulate it, or choose another --out")
    table = out / "table.json"
    if table.exists() and not force:
        try:
            json.loads(table.read_text())["results"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return (f"{table}: exists and is not a ptmpi paper table; pass --force to "
                    "overwrite it, or choose another --out")
    return None


def run_paper(out: Path, size: int, comm: Comm, *, iterations: int | None = None,
              cases: list[str] | None = None, methods: list[str] | None = None,
              force: bool = False, gpu: bool = False) -> dict:
    """Simulate and reconstruct every selected case; rank 0 writes tables and figures.

    ``gpu``: every reconstruction on the rank's GPU (CuPy), as ``reconstruct --gpu``.

    Results of an earlier run in ``out`` (same size) are kept for the case/method pairs not
    run again, so a long reproduction can be done in parts.
    """
    from ptmpi.errors import UserError
    from ptmpi.reconstruct import RunError, reconstruct
    from ptmpi.sim.files import simulate_to_file
    from ptmpi.solvers.admm import SolverSettings
    from ptmpi.solvers.ptycho2d import Ptycho2DSettings

    by_name = {c[0]: c for c in CASES}
    selected = list(CASES) if cases is None else [by_name[name] for name in cases]
    # Before any work: never overwrite a file ptmpi did not write, nor reuse data of
    # another size; rank 0's verdict ends every rank alike.
    failure = _refusal(out, size, selected, methods, force) if comm.is_root else None
    failure = comm.bcast(failure)
    if failure:
        raise RunError(failure)
    results = _previous_results(out, size) if comm.is_root else []
    for case, preset, case_methods in selected:
        settings = scaled_settings(preset, size)
        data = out / f"{case}.h5"
        failure = None
        if comm.is_root:
            try:
                out.mkdir(parents=True, exist_ok=True)
                if force or not data.exists():
                    simulate_to_file(settings, data, force=True)
            except (UserError, OSError) as exc:
                failure = str(exc)
        failure = comm.bcast(failure)  # every rank ends alike on rank 0's failure
        if failure:
            raise RunError(failure)
        for method, paper in case_methods.items():
            if methods is not None and method not in methods:
                continue
            rec = out / f"{case}-{method}.h5"
            if method == "two-step":
                solver = Ptycho2DSettings()
                if iterations is not None:
                    solver = dataclasses.replace(solver, iterations=iterations)
            else:
                solver = SolverSettings(algorithm=method)
                if iterations is not None:
                    solver = dataclasses.replace(solver, iterations=iterations)
            t0 = time.perf_counter()
            summary = reconstruct(str(data), str(rec), solver, comm, algorithm=method,
                                  force=True, figures=False, gpu=gpu)
            row = {
                "case": case, "method": METHOD_LABEL[method], "size": size,
                "snr_db": summary.get("snr_db", math.nan), "r_factor": summary["r_factor"],
                "iterations": summary["iterations"], "wall_s": time.perf_counter() - t0,
                "ranks": comm.size, "gpu": gpu,
                "paper_snr_db": None if paper is None else paper[0],
                "paper_r_factor": None if paper is None else paper[1],
            }
            results = [r for r in results
                       if (r["case"], r["method"]) != (case, row["method"])] + [row]
            if comm.is_root:
                logger.info("paper %s %s: SNR %.2f dB, R-factor %.4g, %.0f s", case,
                            row["method"], row["snr_db"], row["r_factor"], row["wall_s"])
        if comm.is_root:
            # tables after every case, so a long run leaves usable partial results
            done = [c for c in CASES if any(r["case"] == c[0] for r in results)]
            _case_figure(out, case, [m for m in case_methods
                                     if (out / f"{case}-{m}.h5").exists()])
            _write_tables(out, size, comm.size, results, done)
            _convergence_figure(out, [c[0] for c in done])
    comm.barrier()
    return {"results": results}


def _trivial_snr(data_path: Path) -> float:
    import h5py

    from ptmpi.metrics import snr_db

    with h5py.File(data_path, "r") as f:
        truth = f["entry_1/ptmpi/truth/volume"][...]
    return snr_db(np.ones_like(truth), truth)


def _write_tables(out: Path, size: int, n_ranks: int, results: list, selected) -> None:
    on_gpu = any(r.get("gpu") for r in results)
    device = "one GPU per rank (CuPy)" if on_gpu else (platform.processor() or "cpu")
    machine = f"{platform.machine()}, {device}, {n_ranks} MPI rank(s)"
    payload = {"size": size, "ranks": n_ranks, "machine": machine,
               "trivial_snr_db": {c[0]: _trivial_snr(out / f"{c[0]}.h5") for c in selected},
               "results": results}
    (out / "table.json").write_text(json.dumps(payload, indent=2, allow_nan=True))

    def cell(row):
        if row is None:
            return "-"
        return f"{row['snr_db']:.1f} / {row['r_factor']:.3g}"

    def paper_cell(row):
        if row is None:
            return "-"
        if row["paper_snr_db"] is None:
            return "failed"
        return f"{row['paper_snr_db']:.1f} / {row['paper_r_factor']:.4g}"

    lines = [f"# Paper reproduction at {size}^3 ({machine})", "",
             "SNR dB / R-factor; ours beside the paper's (paper at 128^3). "
             "`u = 1` is the empty-sample guess.", "",
             "| case | u = 1 | 2-step | 2-step (paper) | APTs | APTs (paper) | APT | "
             "APT (paper) | APT iterations | APT time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, _, _methods in selected:
        rows = {r["method"]: r for r in results if r["case"] == case}
        apt = rows.get("APT")
        lines.append(
            f"| {case} | {payload['trivial_snr_db'][case]:.1f} | {cell(rows.get('2-step'))} | "
            f"{paper_cell(rows.get('2-step'))} | {cell(rows.get('APTs'))} | "
            f"{paper_cell(rows.get('APTs'))} | {cell(apt)} | {paper_cell(apt)} | "
            f"{apt['iterations'] if apt else '-'} | "
            f"{format(apt['wall_s'], '.0f') if apt else '-'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _case_figure(out: Path, case: str, methods: list[str]) -> None:
    """Central slices of the phase for each method beside the truth (Figs. 2, 3, 5)."""
    import h5py

    from ptmpi.plots import _pyplot, aligned_phase

    plt = _pyplot()
    with h5py.File(out / f"{case}.h5", "r") as f:
        truth = f["entry_1/ptmpi/truth/volume"][...]
    panels = [("truth", np.angle(truth))]
    for method in methods:
        with h5py.File(out / f"{case}-{method}.h5", "r") as f:
            u = f["entry_1/image_1/data"][...]
        panels.append((METHOD_LABEL[method], aligned_phase(u, truth)))
    vmin, vmax = float(np.angle(truth).min()) - 0.1, float(np.angle(truth).max()) + 0.1
    nz, n, _ = truth.shape
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for j, (label, phase) in enumerate(panels):
        for i, (name, img) in enumerate((("z", phase[nz // 2]), ("x", phase[:, :, n // 2]))):
            axes[i, j].imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
            axes[i, j].set_title(f"{label} ({name} slice)", fontsize=8)
            axes[i, j].axis("off")
    fig.suptitle(f"{case}: central slices, phase (rad)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"fig-{case}.png", dpi=60)
    plt.close(fig)


def _convergence_figure(out: Path, cases: list[str]) -> None:
    """Relative change and R-factor per iteration of APT and APTs (Fig. 4)."""
    import h5py

    from ptmpi.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for case in cases:
        for method, style in (("apt", "-"), ("apts", "--")):
            path = out / f"{case}-{method}.h5"
            if not path.exists():
                continue
            with h5py.File(path, "r") as f:
                m = f["entry_1/ptmpi/metrics"]
                it, rel, r = m["iteration"][...], m["rel_change"][...], m["r_factor"][...]
                primal = m["primal_z"][...] if "primal_z" in m else None
            axes[0].semilogy(it, rel, style, label=f"{case} {METHOD_LABEL[method]}")
            axes[1].semilogy(it, r, style, label=f"{case} {METHOD_LABEL[method]}")
            if primal is not None and method == "apt":
                # relative to the first iteration's, so that the cases share one axis
                axes[2].semilogy(it, primal / max(primal[0], 1e-300), style,
                                 label=f"{case} APT")
    axes[0].set_title("relative change ||u_k - u_k+1|| / ||u_k+1||", fontsize=9)
    axes[1].set_title("R-factor", fontsize=9)
    axes[2].set_title("APT primal residual ||z - D u|| / its first value", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fig-convergence.png", dpi=70)
    plt.close(fig)
