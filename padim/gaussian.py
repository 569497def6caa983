"""The statistics of PaDiM: one multivariate Gaussian per patch position, and Mahalanobis distances.

Shapes: B images, C = d channels, P = h * w patch positions.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .config import COVARIANCE_EPSILON
from .errors import PadimError
from .memory import Workspace

RELEASE_EVERY_BYTES = 256 << 20
UNPACK_BLOCK = 256  # positions per dtype conversion or check block
FACTOR_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # storage of the packed factor


class GaussianAccumulator:
    """Streams embeddings batch by batch into per-position mean and covariance, in float64.

    Memory stays O(P * C^2 / 2) whatever the number of images: no embedding is kept, and only the lower
    triangle of each (symmetric) sum of outer products is stored: (P, T) with T = C (C + 1) / 2.
    Sums are taken around a shift (the first batch's mean), which keeps the one-pass covariance formula
    accurate when features have a large mean relative to their spread.

    Positions are handled in blocks of ``chunk``: the float64 temporaries stay small, and ``finalize``
    frees each block of sums as soon as its Cholesky factor is computed, so that the sums and the
    factor are never both held whole (wide_resnet50_2, d=550: 5 GB of sums, 2.5 GB of factor).
    """

    def __init__(self, chunk: Optional[int] = None, shift: Optional[torch.Tensor] = None) -> None:
        self.chunk = chunk  # positions per block; None: as many as keep a block's C x C products near 16 MB
        self.count = 0
        self.shift = shift  # (P, C) float64     first batch's mean, or given (to subtract accumulators)
        self.sum = None  # (P, C)                sum of (x - shift)
        self.outer = None  # list of (p, T)      lower triangles of sum of (x - shift)(x - shift)^T

    def update(self, embeddings: torch.Tensor) -> None:
        """embeddings: (B, P, C), any float dtype (row p of image b is that patch's embedding)."""
        n_img, n_pos, n_ch = embeddings.shape
        device = embeddings.device
        if self.sum is None:
            self.chunk = self.chunk or max(1, min(n_pos, (2 << 20) // (n_ch * n_ch)))
            if self.shift is None:
                self.shift = embeddings.to(torch.float64).mean(dim=0)
            self.sum = torch.zeros(n_pos, n_ch, dtype=torch.float64, device=device)
            rows, cols = torch.tril_indices(n_ch, n_ch, device=device)
            self._lower = rows * n_ch + cols  # (T,) flat indices of the lower triangle
            self.outer = [torch.zeros(min(self.chunk, n_pos - start), len(rows), dtype=torch.float64, device=device)
                          for start in range(0, n_pos, self.chunk)]
        products = torch.empty(self.chunk, n_ch, n_ch, dtype=torch.float64, device=device)
        for block, start in zip(self.outer, range(0, n_pos, self.chunk)):
            stop = start + len(block)
            x = embeddings[:, start:stop].transpose(0, 1).to(torch.float64)  # (p, B, C)
            x = x - self.shift[start:stop].unsqueeze(1)
            self.sum[start:stop] += x.sum(dim=1)
            square = torch.bmm(x.transpose(1, 2), x, out=products[: len(block)])  # (p, C, C)
            block += square.view(len(block), -1).index_select(1, self._lower)
        self.count += n_img

    def without(self, part: "GaussianAccumulator") -> "GaussianAccumulator":
        """The statistics of this accumulator's images less those of ``part`` (a subset of them,
        accumulated around the same ``shift``): sums subtract exactly. A new accumulator; both stay."""
        if part.shift is not self.shift and not torch.equal(part.shift, self.shift):
            raise ValueError("accumulators must share their shift to be subtracted")
        if part.chunk != self.chunk:
            raise ValueError("accumulators must use the same blocks of positions to be subtracted")
        rest = GaussianAccumulator(self.chunk, self.shift)
        rest.count = self.count - part.count
        rest.sum = self.sum - part.sum
        rest._lower = self._lower
        rest.outer = [mine - theirs for mine, theirs in zip(self.outer, part.outer)]
        return rest

    def _covariance_block(self, index: int, epsilon: float) -> torch.Tensor:
        """(p, C, C) float64 unbiased covariance + epsilon * I of block ``index``."""
        start = index * self.chunk
        block = self.outer[index]
        n_ch = self.sum.shape[1]
        mean_shifted = self.sum[start : start + len(block)] / self.count  # (p, C)
        tril = unpack_lower(block, n_ch)
        outer = tril + tril.transpose(1, 2) - torch.diag_embed(tril.diagonal(dim1=1, dim2=2))
        cov = (outer - self.count * mean_shifted.unsqueeze(2) * mean_shifted.unsqueeze(1)) / (self.count - 1)
        cov.diagonal(dim1=1, dim2=2).add_(epsilon)
        return cov

    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"need at least 2 training images to estimate a covariance, got {self.count}")

    def mean(self) -> torch.Tensor:
        """(P, C) float64 mean embedding of every position."""
        self._check_count()
        return self.shift + self.sum / self.count

    def covariance(self, epsilon: float = COVARIANCE_EPSILON) -> torch.Tensor:
        """(P, C, C) float64 unbiased covariance + epsilon * I (whole, so for small problems and tests)."""
        self._check_count()
        return torch.cat([self._covariance_block(i, epsilon) for i in range(len(self.outer))])

    def finalize(self, epsilon: float = COVARIANCE_EPSILON, dtype: torch.dtype = torch.float32,
                 release: Optional[Callable[[], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns mean (P, C) float64 and the packed precision factor (P, T) in ``dtype``: the lower
        triangle of W = L^-1, where covariance + epsilon * I = L L^T, so that W^T W = its inverse.

        Cholesky and a triangular solve rather than an explicit inverse: stabler, and the distance is
        ||W (x - mean)||. Each block of sums is released once its factor is computed; afterwards the
        accumulator is empty. ``release`` (e.g. ``padim.memory.release_free_memory``) is called after
        every 256 MB of released sums, so that the allocator hands them back as it goes.
        """
        mean = self.mean()
        n_pos, n_ch = mean.shape
        factor = torch.empty(n_pos, n_ch * (n_ch + 1) // 2, dtype=dtype, device=mean.device)
        eye = torch.eye(n_ch, dtype=torch.float64, device=mean.device)
        released = 0
        for index in range(len(self.outer)):
            lower = torch.linalg.cholesky(self._covariance_block(index, epsilon))
            released += self.outer[index].numel() * 8
            self.outer[index] = None  # release this block's sums...
            if released > RELEASE_EVERY_BYTES and release is not None:  # ...and hand them back
                release()
                released = 0
            start = index * self.chunk
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)  # (p, C, C)
            factor[start : start + len(inverse)] = inverse.reshape(len(inverse), -1).index_select(1, self._lower)
        self.outer = self.sum = None
        return mean, factor


def mahalanobis(embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor,
                workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Mahalanobis distance of every patch to its position's Gaussian.

    embeddings: (B, P, C); mean: (P, C); factor: (P, C, C) from ``precision_factor``
    returns:    (B, P) = sqrt((x - mean)^T cov^-1 (x - mean)) = ||W (x - mean)||
    workspace:  optional; its reused buffers hold the (B, P, C) temporaries (see ``Workspace``)

    The mean is subtracted in the embeddings' own (contiguous) layout; the product then reads the
    (P, B, C) view directly: a transposing copy costs as much as the subtraction itself.
    """
    n_img, n_pos, n_ch = embeddings.shape
    workspace = workspace if workspace is not None else Workspace()
    delta = workspace.get("delta", (n_img, n_pos, n_ch), factor.dtype, factor.device)
    torch.sub(embeddings, mean.to(factor.dtype), out=delta)
    whitened = workspace.get("whitened", (n_pos, n_img, n_ch), factor.dtype, factor.device)
    torch.bmm(delta.transpose(0, 1), factor.transpose(1, 2), out=whitened)  # (P, B, C): row form of W (x - mean)
    return torch.linalg.vector_norm(whitened, dim=2).T  # (B, P)


def mahalanobis_packed(embeddings: torch.Tensor, mean: torch.Tensor, packed: torch.Tensor,
                       block: int = UNPACK_BLOCK) -> torch.Tensor:
    """``mahalanobis`` with the factor still packed: (B, P, C), (P, C), (P, C (C + 1) / 2) -> (B, P),
    float32. The factor is unpacked ``block`` positions at a time into one reused buffer, so the
    whole (P, C, C) factor (164 MB at d = 100, 4.9 GB at d = 550) is never held: for scoring inside
    a fit, whose peak memory it would raise."""
    n_img, n_pos, n_ch = embeddings.shape
    rows, cols = torch.tril_indices(n_ch, n_ch, device=packed.device)
    buffer = torch.zeros(min(block, n_pos), n_ch, n_ch, dtype=torch.float32, device=packed.device)
    out = torch.empty(n_img, n_pos, dtype=torch.float32, device=packed.device)
    for start in range(0, n_pos, block):
        stop = min(start + block, n_pos)
        factor = buffer[: stop - start]
        factor[:, rows, cols] = packed[start:stop].to(torch.float32)  # the upper triangle stays zero
        out[:, start:stop] = mahalanobis(embeddings[:, start:stop], mean[start:stop], factor)
    return out


def unpack_lower(packed: torch.Tensor, n_channels: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(P, C (C + 1) / 2) row-major lower triangles (``torch.tril_indices`` order) -> (P, C, C) of
    ``dtype`` (default: the packed dtype). Converted in blocks of positions: a float16 file
    never needs a float32 copy of all its triangles on top of the result."""
    rows, cols = torch.tril_indices(n_channels, n_channels, device=packed.device)
    out = torch.zeros(packed.shape[0], n_channels, n_channels, dtype=dtype or packed.dtype, device=packed.device)
    for start in range(0, packed.shape[0], UNPACK_BLOCK):
        out[start : start + UNPACK_BLOCK, rows, cols] = packed[start : start + UNPACK_BLOCK].to(out.dtype)
    return out


def store_factor(packed: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """The packed factor in its storage dtype (``FACTOR_DTYPES``). float16 halves the model file and
    the factor's memory; scoring still computes in float32 (``unpack_lower(..., dtype=float32)``).
    Refuses a factor float16 cannot hold (entries beyond 65504), rather than storing infinities.
    Checked in blocks of positions: a whole-factor mask would add a quarter of the factor's size
    to the fit's peak (620 MB for wide_resnet50_2)."""
    stored = packed.to(FACTOR_DTYPES[dtype_name])
    if stored.dtype != packed.dtype:
        for start in range(0, len(stored), UNPACK_BLOCK):
            if not torch.isfinite(stored[start : start + UNPACK_BLOCK]).all():
                raise PadimError(f"the precision factor has entries beyond {dtype_name}'s range "
                                 f"(largest {packed.abs().max().item():.3g}): fit with factor_dtype float32")
    return stored
