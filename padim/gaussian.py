"""The statistics of PaDiM: one multivariate Gaussian per patch position, and Mahalanobis distances.

Shapes: B images, C = d channels, P = h * w patch positions.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .config import COVARIANCE_EPSILON


class GaussianAccumulator:
    """Streams embeddings batch by batch into per-position mean and covariance, in float64.

    Memory stays O(P * C^2) whatever the number of images: no embedding is kept. Sums are taken around
    a shift (the first batch's mean), which keeps the one-pass covariance formula accurate when features
    have a large mean relative to their spread. Positions are processed ``chunk`` at a time so that the
    float64 temporaries stay small; outer products are added in place (``baddbmm_``, no temporary).
    """

    def __init__(self, chunk: int = 512) -> None:
        self.chunk = chunk
        self.count = 0
        self.shift = None  # (P, C)
        self.sum = None  # (P, C)       sum of (x - shift)
        self.outer = None  # (P, C, C)  sum of (x - shift)(x - shift)^T

    def update(self, embeddings: torch.Tensor) -> None:
        """embeddings: (B, P, C), any float dtype (row p of image b is that patch's embedding)."""
        n_img, n_pos, n_ch = embeddings.shape
        if self.shift is None:
            self.shift = embeddings.to(torch.float64).mean(dim=0)
            self.sum = torch.zeros(n_pos, n_ch, dtype=torch.float64, device=embeddings.device)
            self.outer = torch.zeros(n_pos, n_ch, n_ch, dtype=torch.float64, device=embeddings.device)
        for start in range(0, n_pos, self.chunk):
            stop = min(start + self.chunk, n_pos)
            x = embeddings[:, start:stop].transpose(0, 1).to(torch.float64)  # (p, B, C)
            x = x - self.shift[start:stop].unsqueeze(1)
            self.sum[start:stop] += x.sum(dim=1)
            self.outer[start:stop].baddbmm_(x.transpose(1, 2), x)  # += (p, C, B) @ (p, B, C)
        self.count += n_img

    def finalize(self, epsilon: float = COVARIANCE_EPSILON) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns mean (P, C) and unbiased covariance + epsilon * I (P, C, C), both float64.

        The accumulator's buffers are reused for the covariance, so it cannot be updated afterwards.
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 training images to estimate a covariance, got {self.count}")
        mean_shifted = self.sum / self.count  # (P, C)
        cov = self.outer
        cov.baddbmm_(mean_shifted.unsqueeze(2), mean_shifted.unsqueeze(1), alpha=-self.count)
        cov /= self.count - 1
        cov.diagonal(dim1=1, dim2=2).add_(epsilon)
        mean = self.shift + mean_shifted
        self.outer = self.sum = None
        return mean, cov


def packed_precision_factor(cov: torch.Tensor, chunk: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lower-triangular W with W^T W = cov^-1 (W = L^-1 for the Cholesky factor cov = L L^T), packed.

    cov: (P, C, C) symmetric positive definite -> (P, C (C + 1) / 2) in ``dtype`` (``unpack_lower``
    gives (P, C, C)). Cholesky and a triangular solve rather than an explicit inverse: stabler, and
    the distance becomes ||W (x - mean)||. Done ``chunk`` positions at a time, packed, so that next to
    the float64 covariances only half a float32 factor is held (the peak memory of a fit).
    """
    n_pos, n_ch, _ = cov.shape
    rows, cols = torch.tril_indices(n_ch, n_ch, device=cov.device)
    packed = torch.empty(n_pos, len(rows), dtype=dtype, device=cov.device)
    eye = torch.eye(n_ch, dtype=cov.dtype, device=cov.device)
    for start in range(0, n_pos, chunk):
        lower = torch.linalg.cholesky(cov[start : start + chunk])
        packed[start : start + chunk] = torch.linalg.solve_triangular(lower, eye, upper=False)[:, rows, cols]
    return packed


def mahalanobis(embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every patch to its position's Gaussian.

    embeddings: (B, P, C); mean: (P, C); factor: (P, C, C) from ``precision_factor``
    returns:    (B, P) = sqrt((x - mean)^T cov^-1 (x - mean)) = ||W (x - mean)||
    """
    delta = embeddings.transpose(0, 1).to(factor.dtype) - mean.to(factor.dtype).unsqueeze(1)  # (P, B, C)
    whitened = torch.bmm(delta, factor.transpose(1, 2))  # (P, B, C): row-vector form of W (x - mean)
    return whitened.square().sum(dim=2).sqrt().transpose(0, 1)  # (B, P)


def pack_lower(matrices: torch.Tensor) -> torch.Tensor:
    """(P, C, C) lower-triangular -> (P, C (C + 1) / 2): the zeros above the diagonal are not stored."""
    rows, cols = torch.tril_indices(matrices.shape[-1], matrices.shape[-1], device=matrices.device)
    return matrices[:, rows, cols]


def unpack_lower(packed: torch.Tensor, n_channels: int) -> torch.Tensor:
    """(P, C (C + 1) / 2) -> (P, C, C) lower-triangular; the inverse of ``pack_lower``."""
    rows, cols = torch.tril_indices(n_channels, n_channels, device=packed.device)
    out = packed.new_zeros(packed.shape[0], n_channels, n_channels)
    out[:, rows, cols] = packed
    return out
