"""PNG figures written next to a reconstruction: central slices and convergence curves."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def aligned_phase(u: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Phase of ``u`` after removing the best global complex scale against ``reference``
    (or against the empty-sample value 1 when no reference is given)."""
    ref = np.ones_like(u) if reference is None else reference
    zeta = np.vdot(u, ref) / max(np.vdot(u, u).real, 1e-300)
    return np.angle(zeta * u)


def save_slices(path: Path, volume: np.ndarray, truth: np.ndarray | None = None,
                title: str = "", exp: bool = False) -> None:
    """Central z, y and x slices of the phase (and of the truth beside them, if given).

    ``exp``: a volume of the exponential model (SPEC 8), whose real part is the phase
    shift per voxel: that is shown (its complex angle would be the ratio of attenuation
    to phase)."""
    plt = _pyplot()
    if exp:
        rows = [("reconstruction", np.real(volume))]
        if truth is not None:
            rows.append(("truth", np.real(truth)))
    else:
        rows = [("reconstruction", aligned_phase(volume, truth))]
        if truth is not None:
            rows.append(("truth", np.angle(truth)))
    vmin = min(r[1].min() for r in rows)
    vmax = max(r[1].max() for r in rows)
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    nz, n, _ = volume.shape
    for i, (label, phase) in enumerate(rows):
        cuts = [("z", phase[nz // 2]), ("y", phase[:, n // 2]), ("x", phase[:, :, n // 2])]
        for j, (axis, img) in enumerate(cuts):
            ax = axes[i, j]
            im = ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(f"{label}: central {axis} slice", fontsize=9)
            ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8,
                 label="phase shift per voxel (rad)" if exp else "phase (rad)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_convergence(path: Path, metrics: dict, title: str = "") -> None:
    """R-factor, relative change, ADMM residuals, (when known) SNR and (when it changes:
    the TV continuation) the TV weight per iteration."""
    plt = _pyplot()
    keys = [k for k in ("r_factor", "rel_change", "residuals", "snr_db")
            if (k in metrics and len(metrics[k])) or (k == "residuals" and "primal_z" in metrics)]
    if len(set(np.asarray(metrics.get("tv_weight", []), dtype=float).tolist())) > 1:
        keys.append("tv_weight")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    it = np.asarray(metrics["iteration"])
    labels = {"r_factor": "R-factor", "rel_change": "relative change", "snr_db": "SNR (dB)",
              "residuals": "ADMM residuals", "tv_weight": "TV weight"}
    for ax, key in zip(axes[0], keys, strict=True):
        if key == "residuals":
            plot_residuals(ax, it, metrics)
        else:
            ax.plot(it[:len(metrics[key])], metrics[key])
        if key != "snr_db":
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(labels[key], fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


RESIDUALS = {"primal_z": "primal ||z - Du||", "primal_p": "primal ||p - grad u||",
             "dual_z": "dual r2 ||dz||", "dual_p": "dual r1 ||dp||"}


def plot_residuals(ax, it, metrics: dict, style: str = "-", prefix: str = "") -> None:
    """The primal and dual residuals of the two splits (those that are not all zero)."""
    for key, label in RESIDUALS.items():
        values = np.asarray(metrics.get(key, []), dtype=float)
        if values.size and np.any(values > 0):
            ax.plot(it[:values.size], values, style, label=prefix + label, lw=1)
    ax.legend(fontsize=6)


def save_images(path: Path, images: np.ndarray, probe: np.ndarray, title: str = "",
                max_images: int = 3) -> None:
    """Phase of a few per-angle images (ptycho2d) and the probe's amplitude and phase."""
    plt = _pyplot()
    picks = np.unique(np.linspace(0, images.shape[0] - 1, min(max_images, images.shape[0]))
                      .astype(int))
    fig, axes = plt.subplots(1, len(picks) + 2, figsize=(3.2 * (len(picks) + 2), 3.4),
                             squeeze=False)
    for ax, k in zip(axes[0], picks, strict=False):
        im = ax.imshow(np.angle(images[k]), cmap="gray")
        ax.set_title(f"image {k}: phase", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.7)
    for ax, (label, data, cmap) in zip(axes[0][len(picks):], (
            ("probe amplitude", np.abs(probe), "magma"),
            ("probe phase", np.angle(probe), "twilight")), strict=True):
        im = ax.imshow(data, cmap=cmap)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_shifts(path: Path, angles_deg, shifts, truth=None, std=None) -> None:
    """Per-angle shifts ``(A, 2)`` (row, col) in pixels against the angle (``--align``).

    With ``truth`` (simulated drift) the true shifts are drawn beside them, with their
    unobservable part (:func:`ptmpi.solvers.align.unobservable_part`) replaced by that of
    ``shifts``, so that both follow the same convention. ``std`` ``(A, 2)``: error bars of
    one standard error (the Cramer-Rao bound of the run's output).
    """
    from ptmpi.solvers.align import remove_unobservable

    plt = _pyplot()
    angles_deg = np.asarray(angles_deg, dtype=np.float64)
    shifts = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(angles_deg)
    fig, ax = plt.subplots(figsize=(5, 3))
    for k, (label, colour) in enumerate((("row", "C0"), ("column", "C1"))):
        ax.plot(angles_deg[order], shifts[order, k], "o-", color=colour, label=label)
        if std is not None:
            bars = np.asarray(std, dtype=np.float64).reshape(-1, 2)[order, k]
            ax.errorbar(angles_deg[order], shifts[order, k],
                        yerr=np.where(np.isfinite(bars), bars, 0), fmt="none", ecolor=colour,
                        capsize=2, lw=1)
        if truth is not None:
            theta = np.deg2rad(angles_deg)
            ref = remove_unobservable(truth, theta) + shifts - remove_unobservable(shifts,
                                                                                   theta)
            ax.plot(angles_deg[order], ref[order, k], "x--", color=colour,
                    label=f"{label}, truth")
    ax.set_xlabel("angle (deg)")
    ax.set_ylabel("shift (px)")
    ax.set_title("per-angle shifts (true minus recorded position)"
                 + ("\nbars: Cramer-Rao standard error at the final volume"
                    if std is not None else ""), fontsize=9)
    ax.set_xlim(angles_deg.min() - 5, angles_deg.max() + 25)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_probe_modes(path: Path, modes: np.ndarray, title: str = "") -> None:
    """Amplitude of each incoherent probe mode ``(K, M, M)``, titled with its share of the
    total power."""
    from ptmpi.operators.modes import power_fractions

    plt = _pyplot()
    fractions = power_fractions(modes)
    k = modes.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(3.0 * k, 3.3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(np.abs(modes[i]), cmap="magma")
        ax.set_title(f"mode {i}: {100 * fractions[i]:.1f}% of the power", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.7)
    if title:
        fig.suptitle(f"{title}: probe modes (amplitude)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
