"""The statistics of PaDiM: one multivariate Gaussian per patch position, and Mahalanobis distances.

Shapes: B images, C = d channels, P = h * w patch positions.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from padim.settings.config import COVARIANCE_EPSILON
from padim.errors import PadimError
from padim.files.memory import Workspace
from padim.core.shrinkage import (centred_fourth_moment, ledoit_wolf_shrinkage, oas_shrinkage, recentred_fourth,
                                   shrink, symmetric)

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

    Two more sums, of fourth moments, make the Ledoit-Wolf shrinkage computable without keeping any
    embedding: ``cubic`` (P, C) = sum ||y||^2 y and ``quartic`` (P,) = sum ||y||^4 with y = x - shift
    (P (C + 1) floats: 2 % of the triangles at d = 100). They re-centre and merge exactly like the
    others. Sums read from files written before them have None there (Ledoit-Wolf is then refused).
    """

    def __init__(self, chunk: Optional[int] = None, shift: Optional[torch.Tensor] = None) -> None:
        self.chunk = chunk  # positions per block; None: as many as keep a block's C x C products near 16 MB
        self.count = 0
        self.shift = shift  # (P, C) float64     first batch's mean, or given (to subtract accumulators)
        self.sum = None  # (P, C)                sum of (x - shift)
        self.outer = None  # list of (p, T)      lower triangles of sum of (x - shift)(x - shift)^T
        self.cubic = None  # (P, C)              sum of ||x - shift||^2 (x - shift)
        self.quartic = None  # (P,)              sum of ||x - shift||^4

    @property
    def has_fourth_moments(self) -> bool:
        """Whether ``cubic`` and ``quartic`` are held (needed by the Ledoit-Wolf shrinkage)."""
        return self.cubic is not None and self.quartic is not None

    def update(self, embeddings: torch.Tensor) -> None:
        """embeddings: (B, P, C), any float dtype (row p of image b is that patch's embedding)."""
        n_img, n_pos, n_ch = embeddings.shape
        device = embeddings.device
        if self.sum is None:
            self.chunk = self.chunk or max(1, min(n_pos, (2 << 20) // (n_ch * n_ch)))
            if self.shift is None:
                self.shift = embeddings.to(torch.float64).mean(dim=0)
            self.sum = torch.zeros(n_pos, n_ch, dtype=torch.float64, device=device)
            self.cubic = torch.zeros(n_pos, n_ch, dtype=torch.float64, device=device)
            self.quartic = torch.zeros(n_pos, dtype=torch.float64, device=device)
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
            if self.cubic is not None:
                norms = x.square().sum(dim=2)  # (p, B) = ||x - shift||^2
                self.cubic[start:stop] += torch.bmm(norms.unsqueeze(1), x).squeeze(1)  # (p, C)
                self.quartic[start:stop] += norms.square().sum(dim=1)
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
        if self.has_fourth_moments and part.has_fourth_moments:
            rest.cubic, rest.quartic = self.cubic - part.cubic, self.quartic - part.quartic
        return rest

    @classmethod
    def from_sums(cls, count: int, shift: torch.Tensor, total: torch.Tensor, outer: list,
                  chunk: Optional[int] = None, cubic: Optional[torch.Tensor] = None,
                  quartic: Optional[torch.Tensor] = None) -> "GaussianAccumulator":
        """An accumulator holding given sums (e.g. read back from a statistics file): ``count``
        images, ``shift`` and ``total`` (P, C) float64, ``outer`` a list of (p, T) float64 blocks
        (re-cut into blocks of ``chunk`` positions when given and different); the fourth-moment sums
        ``cubic`` (P, C) and ``quartic`` (P,) when known."""
        n_pos, n_ch = shift.shape
        rows, cols = torch.tril_indices(n_ch, n_ch, device=shift.device)
        out = cls(chunk or len(outer[0]), shift)
        if any(len(block) != out.chunk for block in outer[:-1]) or len(outer[-1]) > out.chunk:
            outer = list(torch.cat(outer).split(out.chunk))
        out.count, out.sum, out.outer, out._lower = int(count), total, list(outer), rows * n_ch + cols
        if cubic is not None and quartic is not None:
            out.cubic, out.quartic = cubic, quartic
        return out

    def recentred(self, shift: torch.Tensor) -> "GaussianAccumulator":
        """The same statistics taken around another ``shift`` (P, C): exact, in float64. With y = x - s
        and delta = s - t, x - t = y + delta, so over the n images
            sum' = sum + n delta
            outer' = outer + sum delta^T + delta sum^T + n delta delta^T   (each lower triangle)
        and, with O the whole outer sum, e = ||delta||^2 (see ``recentred_fourth``)
            cubic' = cubic + tr(O) delta + 2 O delta + 2 (sum . delta) delta + e sum + n e delta
            quartic' = quartic + 4 delta^T O delta + 4 delta . cubic + 2 e tr(O) + 4 e (sum . delta) + n e^2.
        A new accumulator (same blocks); this one stays."""
        shift = shift.to(torch.float64)
        delta = self.shift - shift  # (P, C)
        n_ch = delta.shape[1]
        rows, cols = torch.tril_indices(n_ch, n_ch, device=delta.device)
        out = GaussianAccumulator(self.chunk, shift)
        out.count, out._lower = self.count, self._lower
        out.sum = self.sum + self.count * delta
        out.outer = []
        fourth = self.has_fourth_moments
        if fourth:
            out.cubic, out.quartic = torch.empty_like(self.cubic), torch.empty_like(self.quartic)
        for block, start in zip(self.outer, range(0, len(delta), self.chunk)):
            part = slice(start, start + len(block))
            s, dl = self.sum[part], delta[part]  # (p, C)
            out.outer.append(block + s[:, rows] * dl[:, cols] + dl[:, rows] * s[:, cols]
                             + self.count * dl[:, rows] * dl[:, cols])
            if fourth:
                whole = symmetric(unpack_lower(block, n_ch))  # (p, C, C): the old O
                out.cubic[part], out.quartic[part] = recentred_fourth(
                    self.count, s, whole, self.cubic[part], self.quartic[part], dl)
        return out

    def merged(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        """The statistics of both accumulators' images together (disjoint sets of images, same P
        and C): ``other`` is re-centred onto this one's shift, then the sums add. Exact in float64
        whatever the two shifts; a new accumulator, both stay."""
        if other.sum is None or self.sum is None:  # one holds no image yet: the other's statistics
            return other if self.sum is None else self
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.sum.shape)} and {tuple(other.sum.shape)}")
        if other.chunk != self.chunk:
            other = GaussianAccumulator.from_sums(other.count, other.shift, other.sum, other.outer, self.chunk,
                                                  other.cubic, other.quartic)
        moved = other if torch.equal(other.shift, self.shift) else other.recentred(self.shift)
        out = GaussianAccumulator(self.chunk, self.shift)
        out.count, out._lower = self.count + other.count, self._lower
        out.sum = self.sum + moved.sum
        out.outer = [mine + theirs for mine, theirs in zip(self.outer, moved.outer)]
        if self.has_fourth_moments and moved.has_fourth_moments:
            out.cubic, out.quartic = self.cubic + moved.cubic, self.quartic + moved.quartic
        return out

    def _covariance_block(self, index: int, epsilon: float, covariance: str = "fixed") -> torch.Tensor:
        """(p, C, C) float64 covariance estimate of block ``index`` (see ``covariance``)."""
        start = index * self.chunk
        block = self.outer[index]
        n_ch = self.sum.shape[1]
        mean_shifted = self.sum[start : start + len(block)] / self.count  # (p, C)
        outer = symmetric(unpack_lower(block, n_ch))  # (p, C, C) sum of y y^T
        scatter = outer - self.count * mean_shifted.unsqueeze(2) * mean_shifted.unsqueeze(1)  # sum of centred products
        if covariance == "fixed":
            cov = scatter / (self.count - 1)
            cov.diagonal(dim1=1, dim2=2).add_(epsilon)
            return cov
        mle = scatter / self.count  # (p, C, C) S, the maximum-likelihood covariance
        if covariance == "oas":
            shrinkage = oas_shrinkage(mle, self.count)
        elif covariance == "ledoit-wolf":
            if not self.has_fourth_moments:
                raise PadimError("the Ledoit-Wolf shrinkage needs fourth-moment sums, which these statistics (saved "
                                 "by an older padim) lack: use `covariance` oas or fixed, or refit")
            part = slice(start, start + len(block))
            fourth = centred_fourth_moment(self.count, self.sum[part], outer, self.cubic[part], self.quartic[part])
            shrinkage = ledoit_wolf_shrinkage(mle, self.count, fourth)
        else:
            raise ValueError(f"covariance must be 'fixed', 'oas' or 'ledoit-wolf', got {covariance!r}")
        return shrink(mle, shrinkage)

    def _check_count(self) -> None:
        if self.count < 2:
            raise ValueError(f"need at least 2 training images to estimate a covariance, got {self.count}")

    def mean(self) -> torch.Tensor:
        """(P, C) float64 mean embedding of every position."""
        self._check_count()
        return self.shift + self.sum / self.count

    def covariance(self, epsilon: float = COVARIANCE_EPSILON, covariance: str = "fixed") -> torch.Tensor:
        """(P, C, C) float64 covariance estimate (whole, so for small problems and tests): "fixed", the
        unbiased covariance + epsilon * I; "oas" / "ledoit-wolf", the shrunk maximum-likelihood
        covariance (without epsilon: see ``finalize``)."""
        self._check_count()
        return torch.cat([self._covariance_block(i, epsilon, covariance) for i in range(len(self.outer))])

    def finalize(self, epsilon: float = COVARIANCE_EPSILON, dtype: torch.dtype = torch.float32,
                 release: Optional[Callable[[], None]] = None, keep: bool = False,
                 covariance: str = "fixed") -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns mean (P, C) float64 and the packed precision factor (P, T) in ``dtype``: the lower
        triangle of W = L^-1, where the covariance estimate is L L^T, so that W^T W = its inverse.

        covariance: "fixed" (the paper's): the unbiased covariance + epsilon * I. "oas" or
        "ledoit-wolf": S, the maximum-likelihood covariance (divided by n, as scikit-learn's), shrunk
        towards mu I (mu = tr(S) / C) by the estimated amount; both need only streamed sums. epsilon is
        *not* added then: the shrinkage is the ridge (rho mu I), scaled to the features and to the
        number of images, and adding a constant would undo what it measured. It is only a fallback:
        positions whose shrunk estimate is not positive definite (all images equal there, tr(S) = 0)
        get S + epsilon * I, as "fixed" would.

        Cholesky and a triangular solve rather than an explicit inverse: stabler, and the distance is
        ||W (x - mean)||. Each block of sums is released once its factor is computed; afterwards the
        accumulator is empty. ``release`` (e.g. ``padim.files.memory.release_free_memory``) is called after
        every 256 MB of released sums, so that the allocator hands them back as it goes. ``keep``
        keeps the sums instead (incremental fits add to them later), at the cost of holding both.
        """
        mean = self.mean()
        n_pos, n_ch = mean.shape
        factor = torch.empty(n_pos, n_ch * (n_ch + 1) // 2, dtype=dtype, device=mean.device)
        eye = torch.eye(n_ch, dtype=torch.float64, device=mean.device)
        released = 0
        for index in range(len(self.outer)):
            cov = self._covariance_block(index, epsilon, covariance)
            if covariance == "fixed":
                lower = torch.linalg.cholesky(cov)
            else:
                lower, info = torch.linalg.cholesky_ex(cov)
                failed = torch.nonzero(info).squeeze(1)
                if len(failed):  # degenerate positions: the ridge after all
                    lower[failed] = torch.linalg.cholesky(cov[failed] + epsilon * eye)
            if not keep:
                released += self.outer[index].numel() * 8
                self.outer[index] = None  # release this block's sums...
                if released > RELEASE_EVERY_BYTES and release is not None:  # ...and hand them back
                    release()
                    released = 0
            start = index * self.chunk
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)  # (p, C, C)
            factor[start : start + len(inverse)] = inverse.reshape(len(inverse), -1).index_select(1, self._lower)
        if not keep:
            self.outer = self.sum = self.cubic = self.quartic = None
        return mean, factor

    def shrinkage(self, covariance: str) -> torch.Tensor:
        """(P,) float64 shrinkage intensity of every position under ``covariance`` ("oas" or
        "ledoit-wolf"): 0 keeps S, 1 replaces it by mu I. For reports and tests."""
        self._check_count()
        out = []
        for index, block in enumerate(self.outer):
            cov = self._covariance_block(index, 0.0, "fixed") * ((self.count - 1) / self.count)  # S
            if covariance == "oas":
                out.append(oas_shrinkage(cov, self.count))
            else:
                part = slice(index * self.chunk, index * self.chunk + len(block))
                outer = symmetric(unpack_lower(block, cov.shape[1]))
                fourth = centred_fourth_moment(self.count, self.sum[part], outer, self.cubic[part], self.quartic[part])
                out.append(ledoit_wolf_shrinkage(cov, self.count, fourth))
        return torch.cat(out)


def mahalanobis(embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor,
                workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Mahalanobis distance of every patch to its position's Gaussian.

    embeddings: (B, P, C); mean: (P, C); factor: (P, C, C) from ``precision_factor``
    returns:    (B, P) = sqrt((x - mean)^T cov^-1 (x - mean)) = ||W (x - mean)||
    workspace:  optional; its reused buffers hold the (B, P, C) temporaries (see ``Workspace``)

    The mean is subtracted in the embeddings' own (contiguous) layout; the product then reads the
    (P, B, C) view directly: a transposing copy costs as much as the subtraction itself.
    """
    if workspace is None:  # plain operations (also what torch.export traces): the same products
        delta = embeddings.to(factor.dtype) - mean.to(factor.dtype)  # (B, P, C)
        return torch.linalg.vector_norm(torch.bmm(delta.transpose(0, 1), factor.transpose(1, 2)), dim=2).T
    n_img, n_pos, n_ch = embeddings.shape
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
