"""Compiled host kernels against the numpy code they replace (run only with Numba)."""

from __future__ import annotations

import numpy as np
import pytest

from ptmpi.operators import kernels
from ptmpi.operators.dottest import random_array
from ptmpi.operators.grad import Gradient
from ptmpi.operators.tomo import Projector
from ptmpi.solvers.cg import conjugate_gradient

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="Numba is not installed")


@pytest.fixture
def numpy_only(monkeypatch):
    """Run the enclosed code on the numpy reference path."""
    def use_reference():
        monkeypatch.setattr(kernels, "ENABLED", False)
    return use_reference


@pytest.mark.parametrize("shape", [(5, 19, 19), (37, 11, 11)])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_projector_kernel_equals_scipy_product(dtype, shape, rng, numpy_only):
    """One block of slices, and two (32 + 5 slices: a full block and a zero-padded one)."""
    op = Projector(shape, [0.0, 0.3, 1.2, np.pi / 2, 2.8], dtype=dtype)
    u = random_array(op.shape, dtype, rng)
    p = random_array(op.data_shape, dtype, rng)
    w = rng.uniform(0.5, 2.0, op.data_shape).astype(np.finfo(dtype).dtype)
    compiled = (op.fwd(u), op.adj(p), op.adj(p, np.complex128), op.normal(u, w, np.complex128))
    numpy_only()
    reference = (op.fwd(u), op.adj(p), op.adj(p, np.complex128),
                 op.normal(u, w, np.complex128))
    for a, b in zip(compiled, reference, strict=True):
        assert a.dtype == b.dtype
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def test_projector_kernels_round_as_a_csr_product(rng):
    """Each projection (back-projection) is summed over its row of ``P`` (``P^T``) in
    index order, one rounding per product and per addition: equal, bit for bit, to that
    loop written out (float32 sums for complex64, float64 for the wide adjoint)."""
    op = Projector((3, 9, 9), [0.2, 1.1, 2.5], dtype=np.complex64)
    u = random_array(op.shape, np.complex64, rng)
    p = random_array(op.data_shape, np.complex64, rng)
    m, _ = op._matrix_pair(np, np.float32)
    _, mt64 = op._matrix_pair(np, np.float64)

    def csr_loop(matrix, dense, acc_type):
        out = np.zeros((matrix.shape[0], dense.shape[1]), dtype=acc_type)
        for row in range(matrix.shape[0]):
            for col in range(dense.shape[1]):
                acc = acc_type(0)
                for q in range(matrix.indptr[row], matrix.indptr[row + 1]):
                    acc = acc + matrix.data[q] * acc_type(dense[matrix.indices[q], col])
                out[row, col] = acc
        return out

    cols = u.reshape(3, 81).T.copy().view(np.float32)  # (pixels, 2 * slices)
    ref = csr_loop(m, cols, np.float32).view(np.complex64).reshape(3, 9, 3).transpose(0, 2, 1)
    assert np.array_equal(op.fwd(u), ref)
    cols = p.transpose(0, 2, 1).reshape(27, 3).copy().view(np.float32)  # (bins, 2 slices)
    ref = csr_loop(mt64, cols, np.float64).view(np.complex128).T.reshape(3, 9, 9)
    assert np.array_equal(op.adj(p, np.complex128), ref)


def test_chunk_rows_hold_the_matrix_and_pad_with_exact_zeros(rng):
    import scipy.sparse

    dense = rng.uniform(0.1, 1.0, (9, 40)) * (rng.random((9, 40)) < 0.3)
    dense[4] = 0  # an empty row
    dense[6, :] = rng.uniform(0.1, 1.0, 40)  # 40 non-zeros: five full chunks
    matrix = scipy.sparse.csr_matrix(dense)
    column_row = np.arange(40)[::-1].copy()  # operand row of each column
    ptr, data, offs = kernels.chunk_rows(matrix, column_row, np.float64)
    assert data.shape == offs.shape == (ptr[-1], kernels.CHUNK) and offs.dtype == np.uint32
    assert ptr[5] - ptr[4] == 0 and ptr[7] - ptr[6] == 40 // kernels.CHUNK
    for r in range(dense.shape[0]):
        rebuilt = np.zeros(40)
        np.add.at(rebuilt, column_row[offs[ptr[r]:ptr[r + 1]].ravel()],
                  data[ptr[r]:ptr[r + 1]].ravel())
        assert np.array_equal(rebuilt, dense[r])
        # padding: zero weights on operand rows that the row reads anyway
        used = set(column_row[np.flatnonzero(dense[r])])
        assert set(offs[ptr[r]:ptr[r + 1]].ravel()) <= used
        assert np.count_nonzero(data[ptr[r]:ptr[r + 1]]) == np.count_nonzero(dense[r])


@pytest.mark.parametrize("shape", [(6, 7, 8), (1, 5, 4), (4, 1, 9)])
def test_neg_laplacian_equals_adj_of_gradient(shape, rng, cdtype):
    op = Gradient(shape)
    u = random_array(shape, cdtype, rng)
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    ref = op.adj(op.fwd(u))
    assert np.abs(op.normal(u) - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("precondition", [False, True])
def test_fused_cg_equals_reference_cg(precondition, rng, numpy_only):
    n = 300
    a = random_array((n, n), np.complex128, rng)
    a = (a @ a.conj().T / n + np.eye(n)).astype(np.complex64)
    b = random_array((n,), np.complex64, rng)
    x0 = random_array((n,), np.complex64, rng)
    inv_diag = (1 / np.real(np.diag(a))).astype(np.float32) if precondition else None
    fused = conjugate_gradient(lambda v: a @ v, b, x0, 12, inv_diag=inv_diag)
    numpy_only()
    reference = conjugate_gradient(lambda v: a @ v, b, x0, 12, inv_diag=inv_diag)
    assert np.abs(fused - reference).max() <= 1e-4 * np.abs(reference).max()
    assert np.linalg.norm(a @ fused - b) < 1e-3 * np.linalg.norm(b)


@pytest.mark.parametrize("precondition", [False, True])
def test_fused_cg_on_slices_equals_reference_cg(precondition, rng, numpy_only):
    """The volume form (sums per slice): the fused start, residual and direction passes
    give the reference iterates, and the start's sums are slice_vdot's bit for bit."""
    from ptmpi.parallel.volume import VolumeSpace

    shape = (5, 6, 7)
    op = Gradient(shape)

    def apply_a(v):  # 1 + grad^H grad: Hermitian positive definite
        return v + op.adj(op.fwd(v))

    b = random_array(shape, np.complex64, rng)
    x0 = random_array(shape, np.complex64, rng)
    inv_diag = (1 / (1 + op.normal_diagonal(np, np.float32))) if precondition else None
    r, d, sums = kernels.cg_start(b, apply_a(x0), inv_diag)
    assert np.array_equal(r, b - apply_a(x0))
    assert np.array_equal(d, r if inv_diag is None else inv_diag * r)
    assert np.array_equal(sums[:, 0], kernels.slice_vdot(r, d)[:, 0])
    assert np.array_equal(sums[:, 1], kernels.slice_vdot(b, b)[:, 0])
    space = VolumeSpace(shape)
    fused = conjugate_gradient(apply_a, b, x0, 30, inv_diag=inv_diag, space=space)
    numpy_only()
    reference = conjugate_gradient(apply_a, b, x0, 30, inv_diag=inv_diag, space=space)
    assert np.abs(fused - reference).max() <= 1e-5 * np.abs(reference).max()
    assert np.linalg.norm(apply_a(fused) - b) < 1e-3 * np.linalg.norm(b)


def test_cg_updates_refuse_views_they_cannot_update_in_place():
    x = np.zeros((4, 4), np.complex64)[:, ::2]
    v = np.zeros((4, 2), np.complex64)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.residual_update(x, v.copy(), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.step_and_direction(x, v.copy(), v.copy(), 1.0, 0.5)


@pytest.mark.parametrize("shape", [(6, 7, 8), (1, 5, 4)])
def test_neg_div_sum_equals_adj_of_the_sum(shape, rng, cdtype):
    op = Gradient(shape)
    a = random_array((3, *shape), cdtype, rng)
    b = random_array((3, *shape), cdtype, rng)
    ref = op.adj(a + b)
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    assert np.abs(op.adj_sum(a, b) - ref).max() <= tol * np.abs(ref).max()


def test_tv_step_equals_gradient_shrink_and_multiplier_update(rng, cdtype, numpy_only):
    from ptmpi.solvers.prox import update_tv_split

    shape = (5, 6, 7)
    op = Gradient(shape)
    u = random_array(shape, cdtype, rng)
    lam1 = 0.3 * random_array((3, *shape), cdtype, rng)
    threshold = 2.0  # about half of the magnitudes are shrunk to zero
    lam1_compiled = lam1.copy()
    p_compiled = update_tv_split(op, u, lam1_compiled, threshold)
    numpy_only()
    lam1_reference = lam1.copy()
    p_reference = update_tv_split(op, u, lam1_reference, threshold)
    assert 0.2 < np.mean(p_reference == 0) < 0.8
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    assert np.abs(p_compiled - p_reference).max() <= tol
    assert np.abs(lam1_compiled - lam1_reference).max() <= tol


def test_combine_rounds_the_scaled_sum_once(rng):
    wide = random_array((4, 5, 6), np.complex128, rng)
    extra = random_array((4, 5, 6), np.complex64, rng)
    out = kernels.combine(wide, 0.1, extra, 3.0, np.complex64)
    assert out.dtype == np.complex64
    assert np.abs(out - (0.1 * wide + 3.0 * extra.astype(np.complex128))).max() < 1e-6
    # written over extra (the u-system's operator over its TV term): the same numbers
    in_place = extra.copy()
    assert kernels.combine(wide, 0.1, in_place, 3.0, np.complex64, in_place) is in_place
    assert np.array_equal(in_place, out)
    lap = np.empty_like(extra)
    assert kernels.neg_laplacian(extra, lap) is lap
    assert np.array_equal(lap, kernels.neg_laplacian(extra))
    with pytest.raises(ValueError, match="out"):
        kernels.neg_laplacian(extra, np.empty((4, 5, 6), np.complex128))


def test_windowing_kernels_equal_the_numpy_windows(rng, cdtype, numpy_only):
    from ptmpi.operators.ptycho import Ptycho

    positions = np.array([[0, 0], [2, 5], [-2, 6], [4, -1], [3, 3], [9, 9]], dtype=float)
    probe = random_array((6, 6), cdtype, rng)
    op = Ptycho(probe, positions, [0, 3, 6], (12, 13))
    v = random_array(op.image_stack_shape, cdtype, rng)
    psi = random_array(op.data_shape, cdtype, rng)
    compiled = (op.fwd(v), op.adj(psi))
    numpy_only()
    reference = (op.fwd(v), op.adj(psi))
    tol = 1e-6 if cdtype == np.complex64 else 1e-13
    for a, b in zip(compiled, reference, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.abs(a - b).max() <= tol * np.abs(b).max()


@pytest.mark.parametrize("likelihood", ["ipm", "agm"])
def test_data_split_equals_prox_and_multiplier_update(likelihood, rng, cdtype, numpy_only):
    from ptmpi.solvers.prox import update_data_split

    d = random_array((5, 8, 8), cdtype, rng)
    d[0] = 0  # a frame whose z-step input is zero: any phase is optimal, real axis kept
    lam2 = 0.2 * random_array((5, 8, 8), cdtype, rng)
    lam2[0] = 0
    f = rng.poisson(3.0, size=(5, 8, 8)).astype(np.finfo(cdtype).dtype)
    lam2_compiled = lam2.copy()
    z_compiled = update_data_split(d, lam2_compiled, f, 0.1, likelihood)
    numpy_only()
    lam2_reference = lam2.copy()
    z_reference = update_data_split(d, lam2_reference, f, 0.1, likelihood)
    tol = 1e-5 if cdtype == np.complex64 else 1e-12
    assert np.abs(z_compiled - z_reference).max() <= tol * np.abs(z_reference).max()
    assert np.abs(lam2_compiled - lam2_reference).max() <= tol * np.abs(z_reference).max()
    assert np.all(z_compiled[0].imag == 0) and np.all(z_compiled[0].real >= 0)


def test_log_row_against_numpy(rng):
    """The z-step's vectorizable logarithm: to 3e-16 of log x over the normal range."""
    x = np.exp(rng.uniform(-700.0, 700.0, 4001))
    x[:5] = (1.0, 2.0, np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 3.0), np.finfo(float).tiny)
    x[5:7] = (np.inf, np.nan)
    out = np.empty_like(x)
    kernels._log_row(x, x.size, np.empty(x.size, dtype=np.int64), out)
    ref = np.log(x)
    finite = np.isfinite(ref)
    error = np.abs(out[finite] - ref[finite])
    assert np.all(error <= 3e-16 * np.maximum(np.abs(ref[finite]), 1.0))
    assert out[5] == np.inf and np.isnan(out[6]) and out[0] == 0.0


@pytest.mark.parametrize("likelihood", ["ipm", "agm"])
@pytest.mark.parametrize("epsilon", [0.0, 2.0])
def test_data_split_statistics_in_double(likelihood, epsilon, rng, numpy_only):
    """The compiled z-step's statistics (row sums, the likelihood's own logarithm) against
    the numpy steps in complex128, with a detector mask and the previous z."""
    from ptmpi.solvers.prox import update_data_split

    d = random_array((4, 16, 16), np.complex128, rng) * 3
    lam2 = 0.3 * random_array(d.shape, np.complex128, rng)
    z_old = d + 0.1
    f = rng.poisson(4.0, size=d.shape).astype(np.float64)
    valid = rng.random((4, 16, 16)) > 0.2
    runs = []
    for path in ("compiled", "numpy"):
        if path == "numpy":
            numpy_only()
        lam, stats = lam2.copy(), np.zeros(3)
        z = update_data_split(d, lam, f, 0.5, likelihood, valid, epsilon, z_old, stats)
        runs.append((z, lam, stats))
    (z, lam, stats), (z_ref, lam_ref, stats_ref) = runs
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-13 * np.abs(z_ref).max())
    np.testing.assert_allclose(lam, lam_ref, rtol=0, atol=1e-13 * np.abs(z_ref).max())
    np.testing.assert_allclose(stats, stats_ref, rtol=1e-13)
    assert stats[2] != 0 and stats[1] > 0


def test_step_sums_are_those_of_slice_vdot(rng, cdtype, numpy_only):
    """The iteration's step and its sums in one pass: the step, ||step||^2, ||u||^2 and
    <prev, step> per slice bit for bit as slice_vdot's, the step written over prev."""
    from ptmpi.parallel.volume import VolumeSpace

    u, u_old, prev = (random_array((5, 7, 9), cdtype, rng) for _ in range(3))
    expected = u - u_old
    sums = np.stack([kernels.slice_vdot(expected, expected)[:, 0],
                     kernels.slice_vdot(u, u)[:, 0], kernels.slice_vdot(prev, expected)[:, 0]],
                    axis=1)
    buffer = prev.copy()
    step, out = kernels.step_sums(u, u_old, buffer)
    assert step is buffer and np.array_equal(step, expected)
    assert np.array_equal(out, sums)
    step, out = kernels.step_sums(u, u_old)
    assert np.array_equal(step, expected) and np.array_equal(out[:, :2], sums[:, :2])
    assert not out[:, 2].any()
    # VolumeSpace.step: the norms and <prev, step> of norm() and vdot(), on either path
    volume = VolumeSpace(u.shape)
    reference = (np.linalg.norm(expected), np.linalg.norm(u), np.vdot(prev, expected).real)
    for path in ("compiled", "numpy"):
        if path == "numpy":
            numpy_only()
        buffer = prev.copy()
        step, du, un, back = volume.step(u, u_old, buffer)
        assert (step is buffer) == (path == "compiled") and np.array_equal(step, expected)
        assert (du, un) == (volume.norm(expected), volume.norm(u))
        assert back == volume.vdot(prev, expected).real
        np.testing.assert_allclose((du, un, back), reference, rtol=1e-5)


def _lane_sums(terms):
    """Reference of the kernels' per-slice sums: term i of a slice into partial sum
    i % SUM_LANES, each partial in index order, the partials added in order."""
    out = []
    for row in terms.reshape(terms.shape[0], -1):
        partial = [0.0] * kernels.SUM_LANES
        for i, value in enumerate(row.tolist()):
            partial[i % kernels.SUM_LANES] += value
        total = 0.0
        for value in partial:
            total += value
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 8, 8), (2, 1, 5)])
def test_volume_sums_follow_the_lane_order(shape, rng):
    """slice_vdot, cg_start, residual_update and step_sums all form their sums in the one
    order the docstrings state (so that fused and plain CG agree bit for bit), including
    a slice whose size is not a multiple of the lanes."""
    x, y = (random_array(shape, np.complex64, rng) for _ in range(2))
    inv = rng.random(shape).astype(np.float32)
    wide = [a.astype(np.complex128) for a in (x, y)]
    re = wide[0].real * wide[1].real + wide[0].imag * wide[1].imag
    im = wide[0].real * wide[1].imag - wide[0].imag * wide[1].real
    sums = kernels.slice_vdot(x, y)
    assert np.array_equal(sums[:, 0], _lane_sums(re))
    assert np.array_equal(sums[:, 1], _lane_sums(im))
    r, d, start = kernels.cg_start(x, y, inv)
    rw, dw = r.astype(np.complex128), d.astype(np.complex128)
    assert np.array_equal(start[:, 0], _lane_sums(rw.real * dw.real + rw.imag * dw.imag))
    assert np.array_equal(start[:, 1], _lane_sums(wide[0].real ** 2 + wide[0].imag ** 2))
    rs = kernels.residual_update(r, y, 0.3, inv)
    s = (inv * r).astype(np.complex128)
    rw = r.astype(np.complex128)
    assert np.array_equal(rs, _lane_sums(rw.real * s.real + rw.imag * s.imag))


@pytest.mark.parametrize("shape", [(6, 7, 9), (1, 1, 1), (2, 1, 3), (4, 3, 2), (3, 2, 1)])
def test_combine_neg_laplacian_is_combine_of_the_laplacian(shape, rng, cdtype, numpy_only):
    """The u-system's operator in one pass: a * wide + b (-Lap u), value for value as the
    two kernels it replaces, and within rounding of the numpy steps."""
    u = random_array(shape, cdtype, rng)
    wide = random_array(shape, np.complex128, rng)
    fused = Gradient(shape).normal_plus(u, wide, 0.3, 0.7)
    assert fused.dtype == u.dtype
    assert np.array_equal(fused, kernels.combine(wide, 0.3, kernels.neg_laplacian(u), 0.7,
                                                 u.dtype))
    out = np.empty_like(u)
    assert kernels.combine_neg_laplacian(wide, 0.3, u, 0.7, out) is out
    assert np.array_equal(out, fused)
    with pytest.raises(ValueError, match="must not be u"):
        kernels.combine_neg_laplacian(wide, 0.3, u, 0.7, u)
    numpy_only()
    reference = Gradient(shape).normal_plus(u, wide, 0.3, 0.7)
    tol = 1e-6 if cdtype == np.complex64 else 1e-14
    assert np.abs(fused - reference).max() <= tol * np.abs(reference).max()


@pytest.mark.parametrize("ipm", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_newton_roots_of_a_row_are_those_of_each_pixel(ipm, dtype, rng):
    """The smoothed likelihood's z-step solves a row's Newton roots together (frozen pixel
    by pixel once converged, LANES at a time): each root bit for bit the scalar one's,
    masked pixels untouched, on a row longer than LANES with zero counts and zero input."""
    m = 2 * kernels.LANES + 11
    a2 = (rng.random(m) * 400).astype(dtype)
    f = rng.poisson(a2).astype(dtype)
    a2[:3], f[3:6] = 0, 0
    use = rng.random(m) > 0.1
    r2, one, eps, tol = dtype(0.1), dtype(1), 10.0, kernels.prox_tol(dtype)
    rho = np.full(m, -7.0, dtype=dtype)
    kernels._prox_modulus_row(a2, f, use, r2, ipm, eps, one, tol, rho)
    expected = [dtype(kernels._prox_modulus(np.sqrt(a2[j]), f[j], r2, ipm, eps, one, tol))
                for j in range(m)]
    assert np.array_equal(rho[use], np.array(expected, dtype=dtype)[use])
    assert np.all(rho[~use] == -7.0) and (~use).any()
