"""Run each device operator twice on the same input; report whether the results are
bit-identical (the source of run-to-run differences of GPU runs)."""
import numpy as np, cupy as cp
from ptmpi.sim.presets import PRESETS
from ptmpi.sim.simulate import simulate
from ptmpi.operators.tomo import Projector
from ptmpi.operators.ptycho import Ptycho
from ptmpi.operators.fft import fft2
from ptmpi.operators.grad import Gradient
import dataclasses
data = simulate(dataclasses.replace(PRESETS["demo"], n=64, nz=64, step=16, probe_size=32, fwhm=7.0))
rng = np.random.default_rng(0)
shape = data.volume.shape
u = cp.asarray((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64))
P = Projector(shape, np.deg2rad(data.angles_deg), np.complex64)
pr = P.fwd(u)
op = Ptycho(cp.asarray(data.probe.astype(np.complex64)), data.positions_px, data.frame_offset, (shape[0], shape[2]))
psi = op.fwd(pr)
g = Gradient(shape)
w = cp.abs(pr).astype(cp.float32)
checks = {
    "projector fwd": lambda: P.fwd(u), "projector adj": lambda: P.adj(pr),
    "adj_squared_weights": lambda: P.adj_squared_weights(w),
    "window fwd": lambda: op.fwd(pr), "window adj": lambda: op.adj(psi),
    "fft2": lambda: fft2(psi), "sum": lambda: cp.sum(u, dtype=cp.complex128),
    "vdot": lambda: cp.vdot(u, u), "norm": lambda: cp.linalg.norm(u),
    "grad fwd": lambda: g.fwd(u) if hasattr(g, "fwd") else g(u),
}
for name, fn in checks.items():
    try:
        a, b = fn(), fn()
        same = bool(cp.all(a == b)) if hasattr(a, "shape") else a == b
        diff = float(cp.max(cp.abs(a - b))) if hasattr(a, "shape") else abs(complex(a) - complex(b))
        print(f"{name:22s} bit-identical: {same}  max diff {diff:.3g}")
    except Exception as exc:
        print(f"{name:22s} error {exc!r}")
