"""Discretisations: stability (|Ā| < 1 whenever Re(A) < 0), closed forms, limits.

Shapes: N states.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks.ops.discretize import DISCRETIZATIONS, discretize


def _stable_system(dtype: torch.dtype, extreme: bool = False, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    # dt log-uniform over 12 decades and Re(dt A) log-uniform over a range where |Ā| < 1 is
    # representable (|exp(z)| rounds to 1 for Re(z) above ~-1e-7 in fp32, ~-1e-16 in float64);
    # ``extreme`` goes far below that, and to |Im(dt A)| = 1e4.
    smallest = -60 if extreme else (-11 if dtype == torch.float32 else -27)
    im_max = 1e4 if extreme else 10.0
    dt = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-9, 3))
    re_z = -torch.exp(torch.empty(n, dtype=torch.float64).uniform_(smallest, 9))
    im_z = torch.empty(n, dtype=torch.float64).uniform_(-im_max, im_max)
    A = torch.complex(re_z, im_z) / dt
    return A.to(torch.complex64 if dtype == torch.float32 else torch.complex128), dt.to(dtype)


@pytest.mark.parametrize("method", DISCRETIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretize_stable_when_re_A_negative(method, dtype):
    A, dt = _stable_system(dtype)
    A_bar, gamma = discretize(A, dt, method)
    assert torch.isfinite(A_bar).all() and torch.isfinite(gamma).all()
    assert (A_bar.abs() < 1).all(), f"{method}: max |A_bar| = {A_bar.abs().max()}"
    # The asymmetric form (event steps for A, 1 to 5 times dt) keeps the same guarantee.
    A_bar2, _ = discretize(A, dt, method, dt_A=dt * (1 + 4 * torch.rand_like(dt)))
    assert (A_bar2.abs() < 1).all()
    # Real negative A too.
    A_bar3, _ = discretize(A.real, dt, method)
    assert (A_bar3.abs() < 1).all()


@pytest.mark.parametrize("method", DISCRETIZATIONS)
def test_discretize_never_above_one_in_fp32(method):
    # Far outside the representable range |Ā| rounds to 1 but must never exceed it (no blow-up).
    A, dt = _stable_system(torch.float32, extreme=True, n=4000)
    A_bar, _ = discretize(A, dt, method)
    assert (A_bar.abs() <= 1).all(), f"{method}: max |A_bar| = {A_bar.abs().max()}"


def test_discretize_closed_forms():
    A = torch.complex(-torch.rand(50, dtype=torch.float64) - 0.1, torch.randn(50, dtype=torch.float64) * 3)
    dt = torch.rand(50, dtype=torch.float64) * 0.5 + 0.01
    z = dt * A
    cases = {
        "zoh": (torch.exp(z), (torch.exp(z) - 1) / A),
        "bilinear": ((1 + z / 2) / (1 - z / 2), dt / (1 - z / 2)),
        "dirac": (torch.exp(z), torch.ones_like(z)),
        "mamba": (torch.exp(z), dt.to(z.dtype)),
    }
    for method, (A_bar_exp, gamma_exp) in cases.items():
        A_bar, gamma = discretize(A, dt, method)
        torch.testing.assert_close(A_bar, A_bar_exp, atol=1e-13, rtol=1e-12, msg=method)
        torch.testing.assert_close(gamma * torch.ones_like(A_bar), gamma_exp * torch.ones_like(A_bar),
                                   atol=1e-13, rtol=1e-12, msg=method)


def test_discretize_zoh_is_the_exact_solution_and_bilinear_the_trapezoid_rule():
    # x' = a x + u with u constant over the step: x(dt) = e^{a dt} x0 + (e^{a dt} - 1)/a u.
    a, dt, x0, u = -0.7 + 2.0j, 0.3, 0.4 - 0.2j, 1.3
    A = torch.tensor([a], dtype=torch.complex128)
    A_bar, gamma = discretize(A, dt, "zoh")
    t = torch.linspace(0, dt, 20001, dtype=torch.float64)
    # Integrate numerically: x(dt) = e^{a dt} x0 + int_0^dt e^{a (dt - s)} u ds.
    integrand = torch.exp((dt - t).to(torch.complex128) * a) * u
    integral = torch.trapezoid(integrand, t)
    expected = torch.exp(torch.tensor(a * dt, dtype=torch.complex128)) * x0 + integral
    torch.testing.assert_close((A_bar * x0 + gamma * u)[0], expected, atol=1e-8, rtol=0)
    # Bilinear: x1 - x0 = dt/2 (a x1 + a x0) + dt u.
    A_bar, gamma = discretize(A, dt, "bilinear")
    x1 = (A_bar * x0 + gamma * u)[0]
    torch.testing.assert_close(x1 - x0, dt / 2 * (a * x1 + a * x0) + dt * u, atol=1e-13, rtol=0)


def test_discretize_zoh_small_A_limit():
    # gamma = (e^{dt A} - 1) / A -> dt as A -> 0, accurate to float64 rounding on both sides of the
    # switch to the series at |dt A| = 1e-4 (and at A = 0 exactly).
    dt = torch.tensor(0.5, dtype=torch.float64)
    for a in [0.0, 1e-12, -1e-9, 3e-5, -1.99998e-4, -2.00002e-4, 2e-4, -1e-3]:
        for A in (torch.tensor([a], dtype=torch.float64), torch.tensor([complex(a, a / 2)], dtype=torch.complex128)):
            _, gamma = discretize(A, dt, "zoh")
            z = complex(dt) * complex(A[0])
            expected = complex(dt) * sum(z**k / f for k, f in enumerate((1, 2, 6, 24, 120, 720)))
            assert abs(complex(gamma[0]) - expected) < 4e-16, (a, complex(gamma[0]), expected)
    A = torch.tensor([1e-6], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(discretize(A, dt, "zoh")[1].sum(), A)
    assert abs(float(grad) - float(dt) ** 2 * (0.5 + 0.5e-6 / 3)) < 1e-12  # dt^2 (1/2 + z/3 + ...)


def test_discretize_asymmetric_step():
    A = torch.complex(-torch.rand(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64))
    dt = torch.rand(10, dtype=torch.float64) + 0.1
    dt_A = torch.rand(10, dtype=torch.float64) * 3
    for method in DISCRETIZATIONS:
        A_bar, gamma = discretize(A, dt, method, dt_A=dt_A)
        A_bar_sym, gamma_sym = discretize(A, dt, method)
        A_bar_A, _ = discretize(A, dt_A, method)
        torch.testing.assert_close(A_bar, A_bar_A, atol=1e-14, rtol=0, msg=method)  # Ā from dt_A
        torch.testing.assert_close(gamma, gamma_sym, atol=1e-14, rtol=0, msg=method)  # B̄ from dt
        same, _ = discretize(A, dt, method, dt_A=dt)
        assert torch.equal(same, A_bar_sym)


def test_discretize_unknown_method():
    with pytest.raises(ValueError, match="unknown discretization"):
        discretize(torch.tensor([-1.0]), 0.1, "euler")


def test_discretize_bilinear_polar_form_gradient_matches_direct_formula():
    A = torch.complex(-torch.rand(20, dtype=torch.float64) - 0.01, torch.randn(20, dtype=torch.float64) * 5)
    A.requires_grad_()
    dt = (torch.rand(20, dtype=torch.float64) + 0.01).requires_grad_()
    cot = torch.randn(20, dtype=torch.complex128)
    A_bar, _ = discretize(A, dt, "bilinear")
    z = dt * A
    direct = (1 + z / 2) / (1 - z / 2)
    torch.testing.assert_close(A_bar, direct, atol=1e-14, rtol=1e-13)
    g1 = torch.autograd.grad((A_bar * cot.conj()).real.sum(), (A, dt))
    g2 = torch.autograd.grad((direct * cot.conj()).real.sum(), (A, dt))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-11)
