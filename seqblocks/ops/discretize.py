"""Discretisation of a diagonal continuous-time system ``x' = A x + B u``.

For a step ``dt`` the discrete system is ``x_t = Ā x_{t-1} + B̄ u_t`` with ``B̄ = gamma * B``; every
function here returns ``(Ā, gamma)`` so that callers keep B in whatever layout they use.

=============  ============================  ==============================
method          Ā                             gamma (B̄ = gamma * B)
=============  ============================  ==============================
``zoh``         exp(dt A)                     (exp(dt A) - 1) / A
``bilinear``    (1 + dt A / 2) / (1 - dt A/2) dt / (1 - dt A / 2)
``dirac``       exp(dt A)                     1
``mamba``       exp(dt A)                     dt
=============  ============================  ==============================

``zoh`` holds the input constant over the step; ``bilinear`` is the trapezoidal (Tustin) rule;
``dirac`` treats each input as an impulse (event streams); ``mamba`` is the simplified ZOH of Mamba
(exact Ā, Euler B̄). With Re(A) < 0 and dt > 0, every method gives |Ā| < 1.

The asymmetric form used by event-based models (Event-SSM, STREAM) takes a separate step ``dt_A``
for Ā (the time elapsed since the previous event) while ``gamma`` uses ``dt``.

Shapes: A, dt and dt_A broadcast against each other; outputs have the broadcast shape.
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import outside_autocast

__all__ = ["DISCRETIZATIONS", "discretize"]

DISCRETIZATIONS = ("zoh", "bilinear", "dirac", "mamba")


def _zoh_gamma(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    # (exp(dt A) - 1) / A, written as dt * expm1(z) / z with z = dt A so that A -> 0 tends to dt.
    # Below |z| = 1e-4 the series (to z^3, remainder < z^4 / 120 ~ 1e-18) replaces the quotient,
    # whose autograd derivative e^z / z - expm1(z) / z^2 cancels catastrophically there.
    z = dt * A
    small = z.abs() < 1e-4
    z_safe = torch.where(small, torch.ones_like(z), z)
    ratio = torch.where(small, 1 + z / 2 + z * z / 6 + z * z * z / 24, _expm1(z_safe) / z_safe)
    return dt * ratio


def _expm1(z: torch.Tensor) -> torch.Tensor:
    if z.is_complex():
        # expm1 of a complex z: exp(x)(cos y + i sin y) - 1, with the real part by expm1 and
        # -2 sin^2(y/2) to avoid cancellation near 0.
        x, y = z.real, z.imag
        ex = torch.exp(x)
        real = torch.expm1(x) * torch.cos(y) - 2 * torch.sin(y / 2).square()
        return torch.complex(real, ex * torch.sin(y))
    return torch.expm1(z)


def _bilinear_decay(z: torch.Tensor) -> torch.Tensor:
    # (1 + z/2) / (1 - z/2). For complex z, a plain complex division can round |Ā| one ulp above 1
    # when Re(z) is tiny against Im(z) (fp32), so form it in polar coordinates: with h = z/2,
    # |1 + h|^2 = |1 - h|^2 + 4 Re(h) exactly, hence log|Ā| = log1p(4 Re(h) / |1 - h|^2) / 2 <= 0
    # whenever Re(z) <= 0, in floating point too.
    if not z.is_complex():
        return (1 + z / 2) / (1 - z / 2)
    x, y = z.real / 2, z.imag / 2
    den = (1 - x).square() + y.square()
    log_mag = 0.5 * torch.log1p(4 * x / den)
    phase = torch.atan2(y, 1 + x) - torch.atan2(-y, 1 - x)
    return torch.polar(torch.exp(log_mag), phase)


@outside_autocast
def discretize(
    A: torch.Tensor,
    dt: torch.Tensor | float,
    method: str = "zoh",
    dt_A: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A_bar, gamma)`` with ``B_bar = gamma * B``.

    Args:
        A (Tensor): continuous-time diagonal, real or complex.
        dt (Tensor | float): step for B (and for A when ``dt_A`` is None); positive.
        method (str): one of ``DISCRETIZATIONS``. Default: "zoh".
        dt_A (Tensor | float | None): separate step for A (asymmetric / event form). Default: None.

    Raises:
        ValueError: unknown ``method``.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {method!r}; expected one of {DISCRETIZATIONS}")
    dt = torch.as_tensor(dt, device=A.device, dtype=A.real.dtype)
    step_A = dt if dt_A is None else torch.as_tensor(dt_A, device=A.device, dtype=A.real.dtype)
    if method == "bilinear":
        A_bar = _bilinear_decay(step_A * A)
        gamma = dt / (1 - dt * A / 2)
        return A_bar, gamma
    A_bar = torch.exp(step_A * A)
    if method == "zoh":
        gamma = _zoh_gamma(A, dt)
    elif method == "dirac":
        gamma = torch.ones_like(A_bar)
    else:  # mamba
        gamma = dt.to(A_bar.dtype) * torch.ones_like(A_bar)
    return A_bar, gamma
