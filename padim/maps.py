"""From patch distances to anomaly maps and image scores (upsample, blur, max)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius int(4 sigma + 0.5): (2 * radius + 1,), as scipy and anomalib."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W), blurred with reflected borders, as two 1-D passes (separable Gaussian:
    2K instead of K^2 multiplies per pixel)."""
    kernel = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_maps(patch_scores: torch.Tensor, size: Tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch distances -> (B, H, W) anomaly maps: bilinear upsampling, then the blur."""
    upsampled = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(upsampled.squeeze(1), sigma)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,): an image is as anomalous as its most anomalous pixel."""
    return maps.flatten(1).amax(dim=1)
