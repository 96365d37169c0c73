"""Initialisations of state-space models: HiPPO matrices, their normal-plus-low-rank (NPLR / DPLR)
form, and the diagonal S4D / S5 / LRU initialisations.

HiPPO (Gu et al. 2020) gives continuous-time ``(A, B)`` that project a signal's history onto a
polynomial / Fourier basis: ``legs`` (scaled Legendre, the S4 default), ``legt`` (translated Legendre),
``fourier``. Each is normal plus low rank: ``A = V Λ V^* - P P^T`` (S4, Gu et al. 2022), so in the
eigenbasis V of the normal part ``A + P P^T`` the system is ``Λ - P̃ P̃^*`` with ``P̃ = V^* P`` and
``B̃ = V^* B``. Eigenvalues of a real matrix come in conjugate pairs; one of each pair is kept.

Everything is computed on the CPU (or a given generator's device) in float64 / complex128 and
returned in those dtypes; callers cast and copy into their parameters. So a model built under
``with torch.device("meta"):`` (or any default device) gets the same initial values as one built on
the CPU, and data-dependent steps such as eigenvalue checks never run on a tensor without data.

Shapes: N full state size, n = N / 2 kept eigenvalues, r rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["HIPPO_MEASURES", "S4D_INITS", "hippo", "nplr", "s4d_init", "lru_ring_init", "log_uniform", "on_cpu"]

F = TypeVar("F", bound=Callable)


def on_cpu(fn: F) -> F:
    """Run ``fn`` with the CPU as torch's default device, whatever device context the caller is in
    (``with torch.device("meta"):`` included). For initialisation code whose values are computed
    once and then copied into parameters."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

HIPPO_MEASURES = ("legs", "legt", "fourier")
S4D_INITS = ("legs", "lin", "inv", "legt", "fourier")


@on_cpu
def hippo(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO ``(A [N, N], B [N], P [r, N])`` with ``A + P^T P`` normal (P rows are the rank terms).

    Raises:
        ValueError: unknown measure, or an odd N for ``fourier``.
    """
    q = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        r = (2 * q + 1).sqrt()
        A = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(q + 1)
        B = r.clone()
        P = (q + 0.5).sqrt().unsqueeze(0)
    elif measure == "legt":
        # Translated Legendre with the factor 1/2 that normalises its timescale (as S4 does).
        r = (2 * q + 1).sqrt()
        i, j = q[:, None], q[None, :]
        sign = torch.where(i < j, (-1.0) ** (i - j), torch.ones(()))
        A = -0.5 * r[:, None] * sign * r[None, :]
        B = 0.5 * r
        P0, P1 = r.clone(), r.clone()
        P0[0::2] = 0
        P1[1::2] = 0
        P = torch.stack((P0, P1)) * 0.5**0.5
    elif measure == "fourier":
        if N % 2:
            raise ValueError(f"hippo('fourier') needs an even N, got {N}")
        freqs = torch.arange(N // 2, dtype=torch.float64)
        d = torch.stack((torch.zeros(N // 2, dtype=torch.float64), freqs), -1).reshape(-1)[1:]
        A = math.pi * (-torch.diag(d, 1) + torch.diag(d, -1))
        B = torch.zeros(N, dtype=torch.float64)
        B[0::2] = 2**0.5
        B[0] = 1
        A = A - B[:, None] * B[None, :]
        P = B.clone().unsqueeze(0)
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; expected one of {HIPPO_MEASURES}")
    return A, B, P


@on_cpu
def nplr(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonalise the normal part of a HiPPO matrix, keeping one eigenvalue of each conjugate pair.

    Returns:
        (Lambda [n], P [r, n], B [n], V [N, n]): ``A = V Λ V^* - P P^*`` on the conjugate-completed
        basis ``[V, conj(V)]``, with ``P = V^* P_hippo`` and ``B = V^* B_hippo``.

    Raises:
        ValueError: unknown measure or odd N.
    """
    if N % 2:
        raise ValueError(f"the NPLR form keeps conjugate pairs and needs an even state size, got {N}")
    A, B, P = hippo(measure, N)
    S = A + P.T @ P  # normal: (real diagonal) + skew-symmetric
    re = torch.diagonal(S).mean()
    skew = S - re * torch.eye(N, dtype=torch.float64)
    # -i * skew is Hermitian: its real eigenvalues are the imaginary parts of the spectrum.
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    order = torch.argsort(w, descending=True)
    w, V = w[order][: N // 2], V[:, order][:, : N // 2]
    zero = w.abs() < 1e-9
    if bool(zero.any()):
        # A zero eigenvalue of the skew part (Fourier) has a real eigenspace of even dimension, so an
        # arbitrary eigenvector is not paired with its conjugate. Take a real orthonormal basis of the
        # null space and pair its vectors as (u1 + i u2) / sqrt(2), whose conjugate is the partner.
        _, sv, Vt = torch.linalg.svd(skew)
        null = Vt[sv < 1e-9].T  # [N, 2m] real
        pairs = (null[:, 0::2] + 1j * null[:, 1::2]) / 2**0.5
        V[:, zero] = pairs.to(torch.complex128)
    Lambda = torch.complex(re.expand(N // 2).clone(), w)
    Vh = V.conj().T
    return Lambda, (Vh @ P.T.to(torch.complex128)).T, Vh @ B.to(torch.complex128), V


@on_cpu
def s4d_init(init: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D's diagonal initialisations (Gu et al. 2022, "On the parameterization and initialization of
    diagonal state space models"): ``(Lambda [n], B [n])`` complex, one of each conjugate pair.

    ``legs`` / ``legt`` / ``fourier``: the diagonal of the NPLR form and the projected ``B = V^* B``;
    ``lin``: ``-1/2 + iπk``, B = 1; ``inv``: ``-1/2 + i (N/π)(N/(2k+1) - 1)``, B = 1.

    Raises:
        ValueError: unknown ``init``.
    """
    n = N // 2
    k = torch.arange(n, dtype=torch.float64)
    if init in HIPPO_MEASURES:
        Lambda, _, B, _ = nplr(init, N)
        return Lambda, B
    if init == "lin":
        return torch.complex(torch.full((n,), -0.5, dtype=torch.float64), math.pi * k), torch.ones(
            n, dtype=torch.complex128)
    if init == "inv":
        imag = N / math.pi * (N / (2 * k + 1) - 1)
        return torch.complex(torch.full((n,), -0.5, dtype=torch.float64), imag), torch.ones(
            n, dtype=torch.complex128)
    raise ValueError(f"unknown S4D init {init!r}; expected one of {S4D_INITS}")


def lru_ring_init(n: int, r_min: float, r_max: float, max_phase: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LRU's eigenvalues uniform on the ring ``r_min <= |λ| <= r_max`` with phase in [0, max_phase].

    Returns ``(nu_log, theta_log)`` with ``λ = exp(-exp(nu_log) + i exp(theta_log))`` (Orvieto et al.
    2023): sampling ``|λ|^2`` uniformly in ``[r_min^2, r_max^2]`` makes λ uniform in area on the ring.
    """
    device = generator.device if generator is not None else "cpu"
    u1 = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
    u2 = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
    radius_sq = u1 * (r_max**2 - r_min**2) + r_min**2
    # |λ| = exp(-exp(nu_log)); keep |λ| strictly inside the unit circle and away from 0.
    radius_sq = radius_sq.clamp(min=1e-12, max=1 - 1e-12)
    nu_log = torch.log(-0.5 * torch.log(radius_sq))
    theta_log = torch.log((max_phase * u2).clamp(min=1e-12))
    return nu_log, theta_log


def log_uniform(shape: tuple[int, ...] | int, low: float, high: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples whose log is uniform in [log low, log high] (float64)."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator,
                   device=generator.device if generator is not None else "cpu")
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
