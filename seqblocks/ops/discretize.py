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

__all__ = ["DISCRETIZATIONS", "discretize"]

DISCRETIZATIONS = ("zoh", "bilinear", "dirac", "mamba")


def _zoh_gamma(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    # (exp(dt A) - 1) / A, written as dt * expm1(z) / z with z = dt A so that A -> 0 tends to dt.
    z = dt * A
    small = z.abs() < 1e-4
    z_safe = torch.where(small, torch.ones_like(z), z)
    ratio = torch.where(small, 1 + z / 2 + z * z / 6, _expm1(z_safe) / z_safe)
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
        half = step_A * A / 2
        A_bar = (1 + half) / (1 - half)
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
