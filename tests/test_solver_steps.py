"""The pieces of Algorithm 1: CG, the u-step's signs, the closed-form proxes, the shrink."""

from __future__ import annotations

import numpy as np
import pytest

from ptmpi.operators.dottest import random_array
from ptmpi.operators.grad import Gradient
from ptmpi.operators.model import JointModel
from ptmpi.solvers.cg import conjugate_gradient
from ptmpi.solvers.prox import data_objective, prox_data, shrink_isotropic


def test_cg_solves_hermitian_positive_definite_system(rng):
    k = 12
    b_mat = random_array((k, k), np.complex128, rng)
    a_mat = b_mat.conj().T @ b_mat + 0.5 * np.eye(k)
    b = random_array((k,), np.complex128, rng)
    x = conjugate_gradient(lambda v: a_mat @ v, b, np.zeros(k, complex), iterations=40)
    assert np.linalg.norm(a_mat @ x - b) < 1e-9 * np.linalg.norm(b)
    x0 = random_array((k,), np.complex128, rng)
    x1 = conjugate_gradient(lambda v: a_mat @ v, b, x0, iterations=1)
    assert np.array_equal(x0, x0.copy())  # warm start untouched
    assert np.linalg.norm(a_mat @ x1 - b) < np.linalg.norm(a_mat @ x0 - b)


def test_cg_tolerance_stops_after_the_minimum_and_counts_its_steps(rng):
    """``tol`` stops CG once ``||r|| <= tol ||b||``, but not before ``min_iterations``;
    ``counts`` receives the steps taken."""
    k = 40
    b_mat = random_array((k, k), np.complex128, rng)
    a_mat = b_mat.conj().T @ b_mat + 0.1 * np.eye(k)
    b = random_array((k,), np.complex128, rng)

    def residual(x):
        return np.linalg.norm(a_mat @ x - b) / np.linalg.norm(b)

    counts = []
    x = conjugate_gradient(lambda v: a_mat @ v, b, np.zeros(k, complex), 200, tol=0.2,
                           counts=counts)
    taken = counts[-1]
    assert 1 < taken < 200 and residual(x) <= 0.2
    shorter = conjugate_gradient(lambda v: a_mat @ v, b, np.zeros(k, complex), taken - 1)
    assert residual(shorter) > 0.2  # it stopped at the first step below the tolerance
    x = conjugate_gradient(lambda v: a_mat @ v, b, np.zeros(k, complex), 200, tol=0.2,
                           min_iterations=taken + 3, counts=counts)
    assert counts[-1] == taken + 3 and residual(x) < 0.2
    conjugate_gradient(lambda v: a_mat @ v, b, np.zeros(k, complex), 5, counts=counts)
    assert counts[-1] == 5  # no tolerance: every iteration


def _tiny_model(rng):
    shape = (6, 8, 8)
    positions = np.array([[0, 0], [2, 3], [-1, 4], [3, -2]], dtype=float)
    probe = random_array((5, 5), np.complex128, rng)
    return JointModel(shape, [0.3, 1.9], probe, positions, [0, 2, 4], dtype=np.complex128)


def test_u_step_minimises_the_u_subproblem(rng):
    """The CG system's signs: its solution minimises
    r1/2 ||p + lam1 - grad u||^2 + r2/2 ||z + lam2 - D u||^2 (checked against a dense solve
    of that least-squares problem and by perturbation)."""
    model = _tiny_model(rng)
    grad = Gradient(model.shape)
    r1, r2 = 0.7, 0.3
    z, lam2 = (random_array(model.data_shape, np.complex128, rng) for _ in range(2))
    p, lam1 = (random_array((3, *model.shape), np.complex128, rng) for _ in range(2))
    weight = model.illumination()

    def normal_op(x):
        return r2 * model.normal(x, weight) - r1 * grad.laplacian(x)

    rhs = r2 * model.adj(z + lam2) + r1 * grad.adj(p + lam1)
    u = conjugate_gradient(normal_op, rhs, np.zeros(model.shape, complex), iterations=600)

    def objective(v):
        return (r1 / 2 * np.linalg.norm(p + lam1 - grad.fwd(v)) ** 2
                + r2 / 2 * np.linalg.norm(z + lam2 - model.fwd(v)) ** 2)

    # Dense least squares: stack sqrt(r1) grad and sqrt(r2) D as columns of unit vectors.
    size = int(np.prod(model.shape))
    cols = []
    for k in range(size):
        e = np.zeros(size, complex)
        e[k] = 1
        e = e.reshape(model.shape)
        cols.append(np.concatenate([np.sqrt(r1) * grad.fwd(e).ravel(),
                                    np.sqrt(r2) * model.fwd(e).ravel()]))
    a_mat = np.stack(cols, axis=1)
    target = np.concatenate([np.sqrt(r1) * (p + lam1).ravel(), np.sqrt(r2) * (z + lam2).ravel()])
    u_dense = np.linalg.lstsq(a_mat, target, rcond=None)[0].reshape(model.shape)
    assert np.linalg.norm(u - u_dense) < 1e-6 * np.linalg.norm(u_dense)
    base = objective(u)
    for _ in range(5):
        assert objective(u + 1e-3 * random_array(model.shape, np.complex128, rng)) > base
    # A flipped sign of the TV term is not a minimiser.
    rhs_wrong = r2 * model.adj(z + lam2) - r1 * grad.adj(p + lam1)
    u_wrong = conjugate_gradient(normal_op, rhs_wrong, np.zeros(model.shape, complex), 600)
    assert objective(u_wrong) > base * 1.01


@pytest.mark.parametrize("likelihood", ["agm", "ipm"])
def test_prox_data_minimises_pointwise_objective(likelihood, rng):
    r2 = 0.37
    zt = random_array((1, 4, 4), np.complex128, rng) * 3
    f = rng.uniform(0, 10, size=(1, 4, 4))
    f[0, 0, 0] = 0.0
    z = prox_data(zt, f, r2, likelihood)

    def total(v):
        per = np.abs(v) ** 2
        if likelihood == "agm":
            g = 0.5 * (np.sqrt(per) - np.sqrt(f)) ** 2
        else:
            g = 0.5 * (per - np.where(f > 0, f * np.log(np.maximum(per, 1e-300)), 0))
        return g + r2 / 2 * np.abs(v - zt) ** 2

    best = total(z)
    # Brute force over modulus and phase around the closed form.
    for scale in (0.9, 0.99, 1.01, 1.1):
        assert np.all(total(z * scale) >= best - 1e-12)
    for angle in (0.05, -0.05, 0.5):
        assert np.all(total(z * np.exp(1j * angle)) >= best - 1e-12)
    assert np.allclose(np.angle(z[np.abs(zt) > 0]), np.angle(zt[np.abs(zt) > 0]))
    assert data_objective(np.sqrt(f) + 0j, f, likelihood) <= data_objective(z, f, likelihood)


def test_prox_with_infinite_penalty_limit_and_zero_input():
    f = np.array([[[4.0, 9.0]]])
    zt = np.array([[[1 + 1j, 0]]])
    z = prox_data(zt, f, 1e-12, "agm")
    assert np.allclose(np.abs(z), np.sqrt(f))  # r2 -> 0: modulus projection
    z = prox_data(zt, f, 1e12, "ipm")
    assert np.allclose(z, zt, atol=1e-5)  # r2 -> inf: stays at zt (|z| ~ sqrt(f / r2) at 0)
    assert prox_data(zt, f, 1.0, "agm")[0, 0, 1] == 1.5  # zero input keeps the real axis


def test_shrink_isotropic_is_the_group_soft_threshold(rng):
    pt = random_array((3, 2, 3, 4), np.complex128, rng)
    t = 1.1
    out = shrink_isotropic(pt, t)
    mag = np.sqrt(np.sum(np.abs(pt) ** 2, axis=0))
    out_mag = np.sqrt(np.sum(np.abs(out) ** 2, axis=0))
    assert np.allclose(out_mag, np.maximum(mag - t, 0))
    keep = mag > t
    assert np.allclose(out[:, keep] / out_mag[keep], pt[:, keep] / mag[keep])
