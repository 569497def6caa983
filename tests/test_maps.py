"""Anomaly maps: the blur against SciPy, upsampling, image score = max."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from padim.core.maps import anomaly_maps, gaussian_kernel1d, image_scores


def test_kernel_has_radius_four_sigma_and_sums_to_one():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33  # 2 * int(4 * 4 + 0.5) + 1, as anomalib's kernel for sigma 4
    assert kernel.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_blur_equals_scipy_gaussian_filter_with_mirrored_borders(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 70, 90))
    ours = anomaly_maps(torch.from_numpy(maps), (70, 90), sigma).numpy()  # same size: no upsampling, the blur alone
    for ours_map, original in zip(ours, maps):
        # torch's 'reflect' padding (d c b | a b c d) is scipy's 'mirror'
        expected = gaussian_filter(original, sigma=sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours_map, expected, rtol=1e-10, atol=1e-12)


def test_anomaly_map_has_input_size_and_score_is_its_max():
    patch = torch.zeros(1, 8, 8, dtype=torch.float64)
    patch[0, 2, 5] = 10.0
    maps = anomaly_maps(patch, (64, 64), sigma=4.0)
    assert maps.shape == (1, 64, 64)
    peak = np.unravel_index(int(maps[0].argmax()), (64, 64))
    # the hot patch (row 2, column 5) covers pixels 16..23 x 40..47 of the 64 x 64 map
    assert 16 <= peak[0] <= 23 and 40 <= peak[1] <= 47
    assert image_scores(maps).item() == maps.max().item()


@pytest.mark.parametrize("grid, size", [((16, 16), (64, 64)), ((7, 9), (56, 40))])
def test_anomaly_map_equals_bilinear_upsampling_then_scipy_blur(grid, size):
    # reference: torch's own bilinear interpolation, then SciPy's filter (neither uses padim's matrices)
    rng = np.random.default_rng(1)
    patch = torch.from_numpy(rng.random((3, *grid)) * 10 + 1)
    upsampled = torch.nn.functional.interpolate(patch[:, None], size=size, mode="bilinear", align_corners=False)
    expected = np.stack([gaussian_filter(m, sigma=4.0, mode="mirror", truncate=4.0) for m in upsampled[:, 0].numpy()])
    np.testing.assert_allclose(anomaly_maps(patch, size, sigma=4.0).numpy(), expected, rtol=1e-10)
    float32 = anomaly_maps(patch.float(), size, sigma=4.0).numpy()
    np.testing.assert_allclose(float32, expected, rtol=1e-5)
