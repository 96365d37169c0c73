"""Convolution kernels of linear time-invariant state-space models, in pure PyTorch (complex).

A discrete LTI system ``x_t = Ā x_{t-1} + B̄ u_t``, ``y_t = C x_t`` has the impulse response
``K_l = C Ā^l B̄``, so ``y = K * u`` (``seqblocks.ops.fftconv``). Two generators:

- **Vandermonde** (diagonal Ā = diag(λ): S4D, S5, LRU, Centaurus): ``K_l = sum_n w_n λ_n^l`` with
  ``w = C ⊙ B̄``, evaluated as ``exp(l log λ)`` so that ZOH models pass ``log λ = Δ A`` exactly.
- **Cauchy + Woodbury** (S4's diagonal-plus-low-rank ``A = Λ - P Q^*`` with the bilinear transform):
  the truncated generating function ``sum_{l<M} K_l ω^l = C (I - Ā^M)(I - ω Ā)^{-1} B̄`` at the M-th
  roots of unity equals ``2/(1+ω) · C̃ (g(ω) - A)^{-1} B`` with ``g(ω) = (2/Δ)(1-ω)/(1+ω)``; the
  resolvent of a DPLR matrix is a diagonal (Cauchy) resolvent corrected by the Woodbury identity, and an
  inverse FFT returns ``K``. M is odd so that no root equals -1 (where 1 + ω = 0).

Every DPLR quantity is stored for one eigenvalue of each conjugate pair (``n = N / 2``); the other half
is the complex conjugate and enters the sums as ``x y / (g - λ) + conj(x y) / (g - conj(λ))``.

Shapes: H channels, N full state size, n = N / 2 stored half, r low rank, L kernel length,
F frequencies.
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import outside_autocast

__all__ = ["ssm_powers", "vandermonde_kernel", "cauchy_conj", "dplr_full", "dplr_bilinear", "dplr_kernel",
           "dplr_kernel_direct"]


@outside_autocast
def ssm_powers(log_lam: torch.Tensor, L: int) -> torch.Tensor:
    """``λ^l = exp(l log λ)`` for l < L: [..., N] -> [..., N, L]."""
    ell = torch.arange(L, device=log_lam.device, dtype=log_lam.real.dtype)
    return torch.exp(log_lam.unsqueeze(-1) * ell)


@outside_autocast
def vandermonde_kernel(weights: torch.Tensor, log_lam: torch.Tensor, L: int) -> torch.Tensor:
    """``K_l = sum_n w_n λ_n^l``: weights and log λ [..., N] (complex) -> K [..., L] (complex).

    Materialises [..., N, L] (the memory of one layer's kernel times N); the reduction over n is a
    matrix product so it runs on the tensor cores' complex path where available.
    """
    return torch.einsum("...n,...nl->...l", weights, ssm_powers(log_lam, L))


@outside_autocast
def cauchy_conj(x: torch.Tensor, z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Conjugate-completed Cauchy sum ``sum_n x_n / (z - λ_n) + conj(x_n) / (z - conj(λ_n))``.

    Args:
        x (Tensor): [..., n] numerators (products of the two vectors of a quadratic form).
        z (Tensor): [..., F] evaluation points.
        lam (Tensor): [..., n] poles (one of each conjugate pair).

    Returns:
        Tensor: [..., F].
    """
    zf = z.unsqueeze(-2)  # [..., 1, F]
    xs, ls = x.unsqueeze(-1), lam.unsqueeze(-1)
    return (xs / (zf - ls) + xs.conj() / (zf - ls.conj())).sum(-2)


@outside_autocast
def dplr_full(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor | None = None) -> torch.Tensor:
    """The dense state matrix ``A = diag(Λ) - P Q^*`` in the conjugate-completed basis.

    Args:
        Lambda (Tensor): [H, n] complex diagonal (one of each pair).
        P (Tensor): [H, r, n] low-rank factor; Q (Tensor | None): [H, r, n], None for Q = P.

    Returns:
        Tensor: [H, N, N] with N = 2n.
    """
    Q = P if Q is None else Q
    lam = torch.cat((Lambda, Lambda.conj()), -1)
    Pf = torch.cat((P, P.conj()), -1)  # [H, r, N]
    Qf = torch.cat((Q, Q.conj()), -1)
    return torch.diag_embed(lam) - torch.einsum("hri,hrj->hij", Pf, Qf.conj())


@outside_autocast
def dplr_bilinear(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, dt: torch.Tensor,
                  Q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear discretisation of the DPLR system: dense ``(Ā [H, N, N], B̄ [H, N])``.

    ``Ā = (I - Δ/2 A)^{-1} (I + Δ/2 A)``, ``B̄ = (I - Δ/2 A)^{-1} Δ B`` with B conjugate-completed.
    """
    A = dplr_full(Lambda, P, Q)
    N = A.shape[-1]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    half = (dt / 2).to(A.dtype)[:, None, None]
    left = eye - half * A
    Bf = torch.cat((B, B.conj()), -1)
    A_bar = torch.linalg.solve(left, eye + half * A)
    B_bar = torch.linalg.solve(left, (dt.to(A.dtype)[:, None] * Bf).unsqueeze(-1)).squeeze(-1)
    return A_bar, B_bar


def _matrix_power(A: torch.Tensor, M: int) -> torch.Tensor:
    # Repeated squaring: log2(M) batched matrix products.
    result = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    base = A
    while M:
        if M & 1:
            result = result @ base
        M >>= 1
        if M:
            base = base @ base
    return result


@outside_autocast
def dplr_kernel(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor,
                L: int, Q: torch.Tensor | None = None) -> torch.Tensor:
    """S4's convolution kernel by Cauchy + Woodbury: ``K_l = C Ā^l B̄`` (bilinear), l < L.

    ``C`` is the output vector itself (not S4's ``C̃``): the truncation correction
    ``C̃ = C (I - Ā^M)`` is computed here for the M used, so the kernel is exact for every length.

    Args:
        Lambda (Tensor): [H, n] complex eigenvalues (one of each conjugate pair).
        P (Tensor): [H, r, n] low-rank factor of ``A = Λ - P Q^*``.
        B (Tensor): [H, n] input vector; C (Tensor): [H, n] output vector (halves of conjugate pairs).
        dt (Tensor): [H] positive steps.
        L (int): kernel length.
        Q (Tensor | None): [H, r, n]; None ties Q = P (the normal-plus-low-rank form). Default: None.

    Returns:
        Tensor: [H, L] real.
    """
    Q = P if Q is None else Q
    n = Lambda.shape[-1]
    M = L if L % 2 else L + 1
    A_bar, _ = dplr_bilinear(Lambda, P, B, dt, Q)
    Cf = torch.cat((C, C.conj()), -1)
    C_tilde = Cf - torch.einsum("hi,hij->hj", Cf, _matrix_power(A_bar, M))
    C_t = C_tilde[:, :n]  # the conjugate symmetry of A keeps C̃ conjugate-symmetric

    k = torch.arange(M // 2 + 1, device=Lambda.device, dtype=Lambda.real.dtype)
    omega = torch.exp(-2j * torch.pi * k / M).to(Lambda.dtype)  # [F]
    g = (2.0 / dt.to(Lambda.dtype))[:, None] * ((1 - omega) / (1 + omega))  # [H, F]

    Qc = Q.conj()
    k_cb = cauchy_conj(C_t * B, g, Lambda)  # [H, F]
    k_cp = cauchy_conj(C_t.unsqueeze(1) * P, g.unsqueeze(1), Lambda.unsqueeze(1))  # [H, r, F]
    k_qb = cauchy_conj(Qc * B.unsqueeze(1), g.unsqueeze(1), Lambda.unsqueeze(1))  # [H, r, F]
    k_qp = cauchy_conj(Qc.unsqueeze(2) * P.unsqueeze(1), g[:, None, None], Lambda[:, None, None])  # [H,r,r,F]
    r = P.shape[1]
    eye = torch.eye(r, dtype=Lambda.dtype, device=Lambda.device)
    inner = eye + k_qp.permute(0, 3, 1, 2)  # [H, F, r, r]
    corr = torch.linalg.solve(inner, k_qb.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1)  # [H, F, r]
    k_hat = k_cb - (k_cp.permute(0, 2, 1) * corr).sum(-1)
    k_hat = k_hat * 2 / (1 + omega)
    return torch.fft.irfft(k_hat, n=M)[:, :L]


@outside_autocast
def dplr_kernel_direct(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       dt: torch.Tensor, L: int, Q: torch.Tensor | None = None) -> torch.Tensor:
    """``K_l = Re(C Ā^l B̄)`` by repeated dense products: the slow spec of ``dplr_kernel``."""
    A_bar, B_bar = dplr_bilinear(Lambda, P, B, dt, Q)
    Cf = torch.cat((C, C.conj()), -1)
    out = []
    x = B_bar
    for _ in range(L):
        out.append((Cf * x).sum(-1).real)
        x = torch.einsum("hij,hj->hi", A_bar, x)
    return torch.stack(out, -1)
