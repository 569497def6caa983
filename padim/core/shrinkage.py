"""Covariance shrinkage from streamed sums: the OAS and Ledoit-Wolf intensities per position and the
fourth-moment sums Ledoit-Wolf needs (re-centred and merged exactly, as the other sums).

Shapes: p positions, C channels. Pure tensor functions; ``padim.core.gaussian`` applies them.
"""

from __future__ import annotations

from typing import Tuple

import torch


def oas_shrinkage(mle: torch.Tensor, n: int) -> torch.Tensor:
    """Oracle Approximating Shrinkage intensity (Chen et al. 2010, as ``sklearn.covariance.oas``):
    mle (p, C, C) maximum-likelihood covariances S of n samples -> (p,) in [0, 1].

        mu = tr(S) / C, alpha = mean(S^2), rho = min((alpha + mu^2) / ((n + 1) (alpha - mu^2 / C)), 1)

    Only tr(S) and tr(S^2) = C^2 alpha: computable from the streamed sums."""
    n_ch = mle.shape[-1]
    mu = mle.diagonal(dim1=1, dim2=2).sum(dim=1) / n_ch
    alpha = mle.square().mean(dim=(1, 2))
    numerator = alpha + mu.square()
    denominator = (n + 1) * (alpha - mu.square() / n_ch)
    ratio = numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.ones_like(ratio), ratio.clamp(max=1.0))


def ledoit_wolf_shrinkage(mle: torch.Tensor, n: int, fourth: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage intensity (Ledoit & Wolf 2004, as ``sklearn.covariance.ledoit_wolf``):
    mle (p, C, C) maximum-likelihood covariances S of n samples, fourth (p,) = sum_i ||x_i - mean||^4
    -> (p,) in [0, 1].

        mu = tr(S) / C, delta = (||S||_F^2 - tr(S)^2 / C) / C,
        beta = min((fourth / n - ||S||_F^2) / (C n), delta), rho = beta / delta (0 when beta = 0)

    sum_i ||x_i x_i^T - S||_F^2 = fourth - n ||S||_F^2: fourth moments, which the accumulator streams
    (``cubic``, ``quartic``; see ``centred_fourth_moment``)."""
    n_ch = mle.shape[-1]
    trace = mle.diagonal(dim1=1, dim2=2).sum(dim=1)
    frobenius = mle.square().sum(dim=(1, 2))
    delta = (frobenius - trace.square() / n_ch) / n_ch
    beta = torch.minimum((fourth / n - frobenius) / (n_ch * n), delta)
    positive = beta > 0  # beta >= 0 in exact arithmetic (sum ||x||^4 / n >= tr(S)^2 >= ||S||_F^2)
    return torch.where(positive, beta / torch.where(positive, delta, torch.ones_like(delta)), torch.zeros_like(beta))


def centred_fourth_moment(n: int, total: torch.Tensor, outer: torch.Tensor, cubic: torch.Tensor,
                          quartic: torch.Tensor) -> torch.Tensor:
    """sum_i ||x_i - mean||^4 per position from sums around a shift (y = x - shift): total (p, C) =
    sum y, outer (p, C, C) = sum y y^T, cubic (p, C) = sum ||y||^2 y, quartic (p,) = sum ||y||^4.
    With m = total / n and c = ||m||^2, ||y - m||^2 = ||y||^2 - 2 y.m + c, and squaring and summing,

        quartic - 4 m.cubic + 4 m^T outer m + 2 c tr(outer) - 3 n c^2."""
    m = total / n  # (p, C)
    c = m.square().sum(dim=1)
    quadratic = torch.einsum("pi,pij,pj->p", m, outer, m)
    trace = outer.diagonal(dim1=1, dim2=2).sum(dim=1)
    return quartic - 4 * (m * cubic).sum(dim=1) + 4 * quadratic + 2 * c * trace - 3 * n * c.square()


def shrink(mle: torch.Tensor, shrinkage: torch.Tensor) -> torch.Tensor:
    """(1 - rho) S + rho mu I per position: mle (p, C, C), shrinkage (p,) -> (p, C, C)."""
    mu = mle.diagonal(dim1=1, dim2=2).mean(dim=1)  # (p,)
    out = (1.0 - shrinkage)[:, None, None] * mle
    out.diagonal(dim1=1, dim2=2).add_((shrinkage * mu).unsqueeze(1))
    return out


def symmetric(tril: torch.Tensor) -> torch.Tensor:
    """(p, C, C) lower triangles -> the symmetric matrices they are the lower half of."""
    return tril + tril.transpose(1, 2) - torch.diag_embed(tril.diagonal(dim1=1, dim2=2))


def recentred_fourth(n: int, total: torch.Tensor, outer: torch.Tensor, cubic: torch.Tensor, quartic: torch.Tensor,
                      delta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fourth-moment sums around shift - delta, from those around shift (see
    ``GaussianAccumulator.recentred``): total, cubic, delta (p, C); outer (p, C, C); quartic (p,)."""
    e = delta.square().sum(dim=1)  # (p,)
    trace = outer.diagonal(dim1=1, dim2=2).sum(dim=1)
    o_delta = torch.bmm(outer, delta.unsqueeze(2)).squeeze(2)  # (p, C)
    s_delta = (total * delta).sum(dim=1)
    new_cubic = (cubic + trace[:, None] * delta + 2 * o_delta + 2 * s_delta[:, None] * delta
                 + e[:, None] * total + n * e[:, None] * delta)
    new_quartic = (quartic + 4 * (delta * o_delta).sum(dim=1) + 4 * (delta * cubic).sum(dim=1) + 2 * e * trace
                   + 4 * e * s_delta + n * e.square())
    return new_cubic, new_quartic
