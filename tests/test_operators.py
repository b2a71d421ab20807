"""Operators: exact adjoints, unitary FFT, projector orientation, line integrals, reference."""

from __future__ import annotations

import numpy as np
import pytest

from ptmpi.operators.dottest import DOT_TOL, dottest, random_array
from ptmpi.operators.fft import FarField
from ptmpi.operators.grad import Gradient
from ptmpi.operators.ptycho import Ptycho
from ptmpi.operators.tomo import Projector


def _theta(k):
    # Includes angles on every octant boundary and generic ones.
    return np.concatenate([np.arange(8) * np.pi / 8, [0.3, 1.1, 2.9, -0.7, 4.0]])[:k]


@pytest.mark.parametrize("shape", [(5, 16, 16), (3, 17, 17)])
def test_projector_dottest(shape, cdtype, rng, xp):
    op = Projector(shape, _theta(13), dtype=cdtype)
    err = dottest(op.fwd, op.adj, shape, op.data_shape, cdtype, rng, xp)
    assert err < DOT_TOL[cdtype]


def test_projector_orientation_cases(rng, xp):
    u = xp.asarray(random_array((4, 20, 20), np.complex128, rng))
    p = Projector(u.shape, [0.0, np.pi / 2], dtype=np.complex128).fwd(u)
    # theta = 0: rays along y, column c is x = j.
    assert float(xp.abs(p[0] - u.sum(axis=1)).max()) < 1e-12
    # theta = pi/2: rays along x, column c is y = i.
    assert float(xp.abs(p[1] - u.sum(axis=2)).max()) < 1e-12


@pytest.mark.parametrize("radius", [20, 31])
def test_projector_cylinder_line_integral(radius):
    n = 2 * radius + 12
    c = np.arange(n) - (n - 1) / 2
    disk = (c[:, None] ** 2 + c[None, :] ** 2 <= radius**2).astype(np.float64)
    u = np.repeat(disk[None], 2, axis=0).astype(np.complex128)
    theta = np.linspace(0, np.pi, 19)
    p = Projector(u.shape, theta, dtype=np.complex128).fwd(u).real
    s = c
    inner = np.abs(s) < radius - 1
    exact = 2 * np.sqrt(radius**2 - s[inner] ** 2)
    for a in range(theta.size):
        for k in range(2):
            rel_rms = np.sqrt(np.mean((p[a, k, inner] - exact) ** 2) / np.mean(exact**2))
            assert rel_rms < 0.03, (theta[a], rel_rms)


def _clip_area(square, cos, sin, lo, hi):
    """Area of a convex polygon inside the strip lo <= x cos + y sin <= hi (Sutherland-Hodgman)."""

    def clip(poly, sign, bound):
        out = []
        for i in range(len(poly)):
            p, q = poly[i], poly[(i + 1) % len(poly)]
            fp = sign * (p[0] * cos + p[1] * sin - bound)
            fq = sign * (q[0] * cos + q[1] * sin - bound)
            if fp <= 0:
                out.append(p)
            if fp * fq < 0:
                t = fp / (fp - fq)
                out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
        return out

    poly = clip(clip(square, -1, lo), 1, hi)
    if len(poly) < 3:
        return 0.0
    xs, ys = np.array(poly).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def slow_reference_projection(u, theta):
    """Loop over angles, voxels and detector bins: bin value = sum of voxel-square areas
    inside the bin's strip times the voxel value (the discretization Projector claims)."""
    nz, n, _ = u.shape
    centre = (n - 1) / 2
    out = np.zeros((len(theta), nz, n), dtype=u.dtype)
    for a, th in enumerate(theta):
        cos, sin = np.cos(th), np.sin(th)
        for i in range(n):
            for j in range(n):
                x, y = j - centre, i - centre
                square = [(x + dx, y + dy) for dx, dy in
                          ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))]
                for col in range(n):
                    s = col - centre
                    w = _clip_area(square, cos, sin, s - 0.5, s + 0.5)
                    if w > 0:
                        out[a, :, col] += w * u[:, i, j]
    return out


def test_projector_matches_slow_reference(rng):
    u = random_array((3, 9, 9), np.complex128, rng)
    theta = np.array([0.0, 0.2, np.pi / 4, 1.0, np.pi / 2, 2.0, 2.9, 3.5])
    fast = Projector(u.shape, theta, dtype=np.complex128).fwd(u)
    ref = slow_reference_projection(u, theta)
    assert np.abs(fast - ref).max() / np.abs(ref).max() < 1e-12


def test_projector_preserves_dtype_and_rejects_bad_shape(rng):
    op = Projector((2, 8, 8), [0.1, 0.2])
    u = random_array((2, 8, 8), np.complex64, rng)
    assert op.fwd(u).dtype == np.complex64
    assert op.adj(op.fwd(u)).dtype == np.complex64
    with pytest.raises(ValueError, match="expected volume"):
        op.fwd(random_array((2, 8, 9), np.complex64, rng))
    with pytest.raises(ValueError, match="square"):
        Projector((2, 8, 9), [0.0])


def test_farfield_dottest_and_norm(cdtype, rng, xp):
    op = FarField()
    shape = (3, 16, 16)
    assert dottest(op.fwd, op.adj, shape, shape, cdtype, rng, xp) < DOT_TOL[cdtype]
    x = xp.asarray(random_array(shape, cdtype, rng))
    d = op.fwd(x)
    assert d.dtype == cdtype
    rel = abs(float(xp.linalg.norm(d)) - float(xp.linalg.norm(x))) / float(xp.linalg.norm(x))
    assert rel < DOT_TOL[cdtype] * 10
    # zero frequency at [0, 0]: the DC term is the sum / M.
    assert abs(complex(d[0, 0, 0]) - complex(x[0].sum()) / 16) < 1e-4 * abs(complex(x[0].sum()))
    assert float(xp.abs(op.adj(d) - x).max()) < DOT_TOL[cdtype] * 100


def _ptycho(cdtype, rng, xp, image=(20, 24), m=8):
    positions = np.array(
        [[0, 0], [5, 7], [-3, -2], [15, 20], [12, -6], [6, 6], [-7, 16], [19, 23]], dtype=float
    )
    frame_offset = np.array([0, 3, 3, 8])  # the middle angle has no frame
    probe = xp.asarray(random_array((m, m), cdtype, rng))
    return Ptycho(probe, positions, frame_offset, image)


def test_ptycho_dottest_with_edge_windows(cdtype, rng, xp):
    op = _ptycho(cdtype, rng, xp)
    err = dottest(op.fwd, op.adj, op.image_stack_shape, op.data_shape, cdtype, rng, xp)
    assert err < DOT_TOL[cdtype]


def test_ptycho_window_values_and_illumination(rng):
    op = _ptycho(np.complex128, rng, np)
    v = random_array(op.image_stack_shape, np.complex128, rng)
    psi = op.extract(v)
    # frame 1 of angle 0 sits fully inside: a plain slice.
    assert np.array_equal(psi[1], v[0, 5:13, 7:15])
    # frame 2 hangs over the top-left edge: outside pixels read as zero.
    assert np.all(psi[2][:3] == 0) and np.all(psi[2][:, :2] == 0)
    assert np.array_equal(psi[2][3:, 2:], v[0, 0:5, 0:6])
    # W = sum_j S_j^H |omega|^2 equals the scatter of |omega|^2 and is zero for the empty angle.
    w = op.illumination()
    assert w.dtype == np.float64
    assert np.all(w[1] == 0)
    expected = np.zeros((20, 24))
    for r, c in [(0, 0), (5, 7), (-3, -2)]:
        big = np.zeros((20 + 16, 24 + 16))
        big[8 + r : 8 + r + 8, 8 + c : 8 + c + 8] += np.abs(op.probe) ** 2
        expected += big[8:-8, 8:-8]
    assert np.allclose(w[0], expected)


def test_ptycho_rejects_window_outside_and_keeps_subpixel(rng):
    probe = np.ones((4, 4), np.complex64)
    with pytest.raises(ValueError, match="frame 1 .*no pixel inside"):
        Ptycho(probe, [[0, 0], [30, 1]], [0, 2], (10, 10))
    with pytest.raises(ValueError, match="frame 0 .*no pixel inside"):
        Ptycho(probe, [[-4, 0]], [0, 1], (10, 10))
    # the integer corner is the floor: -3.5 puts the window at -4, fully outside
    with pytest.raises(ValueError, match="frame 0 .*no pixel inside"):
        Ptycho(probe, [[-3.5, 0]], [0, 1], (10, 10))
    Ptycho(probe, [[-3, 9]], [0, 1], (10, 10))  # one pixel inside is enough
    op = Ptycho(probe, [[0.4, 1.0], [2.0, -1.75]], [0, 2], (10, 10))
    assert op.positions.tolist() == [[0.4, 1.0], [2.0, -1.75]]
    assert op.corners.tolist() == [[0, 1], [2, -2]]
    np.testing.assert_allclose(op.fractions, [[0.4, 0.0], [0.0, 0.25]])


def test_gradient_dottest_and_laplacian(cdtype, rng, xp):
    shape = (4, 6, 5)
    op = Gradient(shape)
    assert dottest(op.fwd, op.adj, shape, (3, *shape), cdtype, rng, xp) < DOT_TOL[cdtype]
    # a linear ramp along x has unit forward differences and zero at the last column
    u = xp.asarray(np.broadcast_to(np.arange(5.0), shape).astype(cdtype))
    g = op.fwd(u)
    assert float(xp.abs(g[2, :, :, :-1] - 1).max()) == 0
    assert float(xp.abs(g[2, :, :, -1]).max()) == 0
    assert float(xp.abs(g[:2]).max()) == 0
    # Laplacian is negative semidefinite: <u, Lap u> = -||grad u||^2
    x = xp.asarray(random_array(shape, cdtype, rng))
    lhs = complex(xp.vdot(x, op.laplacian(x)))
    assert abs(lhs + float(xp.linalg.norm(op.fwd(x))) ** 2) < 1e-4 * abs(lhs)


def test_joint_model_dottest_and_normal_operator(cdtype, rng, xp):
    from ptmpi.operators.model import JointModel

    shape = (10, 12, 12)
    positions = np.array([[0, 0], [2, 5], [-2, 6], [4, -1], [3, 3]], dtype=float)
    probe = xp.asarray(random_array((6, 6), cdtype, rng))
    model = JointModel(shape, [0.2, 1.3], probe, positions, [0, 3, 5], dtype=cdtype)
    err = dottest(model.fwd, model.adj, shape, model.data_shape, cdtype, rng, xp)
    assert err < DOT_TOL[cdtype]
    u = xp.asarray(random_array(shape, cdtype, rng))
    w = model.illumination(xp)
    lhs = model.normal(u, w)
    rhs = model.adj(model.fwd(u))
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    assert float(xp.linalg.norm(lhs - rhs)) < tol * float(xp.linalg.norm(rhs))


def test_projector_squared_weights_give_normal_operator_diagonal(rng):
    shape = (2, 6, 6)
    op = Projector(shape, [0.0, 0.4, 2.2], dtype=np.complex128)
    w = rng.uniform(0.5, 2.0, size=op.data_shape)
    diag = op.adj_squared_weights(w)
    size = int(np.prod(shape))
    for k in rng.choice(size, 10, replace=False):
        e = np.zeros(size, complex)
        e[k] = 1
        e = e.reshape(shape)
        assert np.isclose(diag.ravel()[k], np.vdot(e, op.adj(w * op.fwd(e))).real)


def test_gradient_normal_diagonal():
    shape = (3, 4, 1)
    op = Gradient(shape)
    diag = op.normal_diagonal(np, np.float64)
    size = int(np.prod(shape))
    for k in range(size):
        e = np.zeros(size)
        e[k] = 1
        e = e.reshape(shape)
        assert diag.ravel()[k] == np.vdot(e, -op.laplacian(e))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("step", [1, 3])
def test_projector_slabs_equal_one_product(step, compiled, rng, monkeypatch):
    """Cache blocking (slabs of 1 and 3 slices of 7, remainder included; tiles of pixel
    rows) changes nothing, on the compiled path and on the scipy path."""
    from ptmpi.operators import kernels

    if compiled and not kernels.ENABLED:
        pytest.skip("Numba is not installed")
    monkeypatch.setattr(kernels, "ENABLED", compiled)
    shape = (7, 16, 16)
    op = Projector(shape, _theta(13), dtype=np.complex64)
    u = random_array(shape, np.complex64, rng)
    p = random_array(op.data_shape, np.complex64, rng)
    w = rng.uniform(0.5, 2.0, size=op.data_shape).astype(np.float32)
    monkeypatch.setattr(op, "slabs", lambda xp, itemsize=None: [(0, 7)])
    monkeypatch.setattr(op, "kernel_step", lambda itemsize: 7)
    whole = (op.fwd(u), op.adj(p), op.adj(p, np.complex128), op.normal(u, w, np.complex128))
    monkeypatch.setattr(op, "slabs", lambda xp, itemsize=None: [
        (k, min(7, k + step)) for k in range(0, 7, step)])
    monkeypatch.setattr(op, "kernel_step", lambda itemsize: step)
    blocked = (op.fwd(u), op.adj(p), op.adj(p, np.complex128), op.normal(u, w, np.complex128))
    for a, b in zip(whole, blocked, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    # Nor do the tiles of pixel rows of the compiled forward projection (1, 3 of 16, all).
    for tile in (1, 3, 16):
        monkeypatch.setattr(op, "tile_rows", lambda rdtype, tile=tile: tile)
        tiled = (op.fwd(u), op.normal(u, w, np.complex128))
        assert np.array_equal(tiled[0], whole[0]) and np.array_equal(tiled[1], whole[3])
    # The fused normal operator equals adj(w * fwd(u)) formed in the wide dtype.
    ref = op.adj((w * op.fwd(u)).astype(np.complex128), np.complex128)
    assert np.abs(blocked[3] - ref).max() < 1e-12 * np.abs(ref).max()
