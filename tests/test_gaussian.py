"""Gaussian statistics and Mahalanobis distances against NumPy / SciPy on the same numbers."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from padim.core.gaussian import GaussianAccumulator, mahalanobis, mahalanobis_packed, store_factor, unpack_lower
from padim.files.memory import Workspace


def _embeddings(seed, n_img=41, n_pos=7, n_ch=5):
    rng = np.random.default_rng(seed)
    # a large common offset makes a naive one-pass covariance lose digits
    return rng.normal(0, 1, (n_img, n_pos, n_ch)) * rng.uniform(0.5, 3, n_ch) + 1e3


@pytest.mark.parametrize("splits", [[41], [1, 40], [7, 7, 7, 20], [2] * 20 + [1]])
def test_accumulated_statistics_equal_numpy_whatever_the_batch_split(splits):
    x = _embeddings(0)  # (B, P, C) float64
    acc = GaussianAccumulator(chunk=3)
    start = 0
    for size in splits:
        acc.update(torch.from_numpy(x[start : start + size]))
        start += size
    cov, mean = acc.covariance(epsilon=0.01), acc.mean()

    for p in range(x.shape[1]):
        expected_cov = np.cov(x[:, p, :], rowvar=False) + 0.01 * np.eye(x.shape[2])
        np.testing.assert_allclose(cov[p].numpy(), expected_cov, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(mean[p].numpy(), x[:, p, :].mean(axis=0), rtol=1e-12)


def test_float32_embeddings_are_accumulated_in_float64():
    x32 = _embeddings(1).astype(np.float32)
    acc = GaussianAccumulator()
    acc.update(torch.from_numpy(x32))
    cov = acc.covariance()
    assert cov.dtype == torch.float64
    expected = np.cov(x32[:, 0, :].astype(np.float64), rowvar=False) + 0.01 * np.eye(5)
    np.testing.assert_allclose(cov[0].numpy(), expected, rtol=1e-9, atol=1e-9)


def test_one_image_is_not_enough():
    acc = GaussianAccumulator()
    acc.update(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize()
    with pytest.raises(ValueError, match="at least 2"):
        acc.covariance()


def test_precision_factor_whitens_the_covariance():
    x = _embeddings(2)
    acc = GaussianAccumulator(chunk=3)
    acc.update(torch.from_numpy(x[:20]))
    acc.update(torch.from_numpy(x[20:]))
    mean, packed = acc.finalize(dtype=torch.float64)
    assert packed.shape == (7, 15)
    factor = unpack_lower(packed, 5)
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=0), rtol=1e-12)
    for p in range(7):
        w = factor[p].numpy()
        expected_cov = np.cov(x[:, p, :], rowvar=False) + 0.01 * np.eye(5)
        np.testing.assert_allclose(w.T @ w, np.linalg.inv(expected_cov), rtol=1e-7, atol=1e-10)
        assert np.allclose(np.triu(w, 1), 0)


@pytest.mark.parametrize("reuse_buffers", [False, True, "packed"])
def test_mahalanobis_equals_scipy(reuse_buffers):
    rng = np.random.default_rng(3)
    n_pos, n_ch = 6, 4
    a = rng.normal(size=(n_pos, n_ch, n_ch))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(n_ch)
    mean = rng.normal(size=(n_pos, n_ch))
    x = rng.normal(size=(3, n_pos, n_ch)) * 2  # (B, P, C)

    factor = torch.from_numpy(np.linalg.cholesky(np.linalg.inv(cov)).transpose(0, 2, 1))  # W^T W = cov^-1
    if reuse_buffers == "packed":  # the factor unpacked a few positions at a time (float32)
        rows, cols = torch.tril_indices(n_ch, n_ch)
        lower = torch.from_numpy(np.linalg.inv(np.linalg.cholesky(cov)))  # lower triangular, W^T W = cov^-1
        packed = lower[:, rows, cols]
        ours = mahalanobis_packed(torch.from_numpy(x), torch.from_numpy(mean), packed, block=4).double().numpy()
        for b in range(3):
            for p in range(n_pos):
                expected = scipy_mahalanobis(x[b, p], mean[p], np.linalg.inv(cov[p]))
                assert ours[b, p] == pytest.approx(expected, rel=1e-5)
        return
    if reuse_buffers:  # a workspace that already served a larger batch: its buffers are sliced
        workspace = Workspace()
        mahalanobis(torch.from_numpy(np.concatenate([x, x])), torch.from_numpy(mean), factor, workspace)
        ours = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), factor, workspace).numpy()
    else:
        ours = mahalanobis(torch.from_numpy(x), torch.from_numpy(mean), factor).numpy()  # (B, P)

    for b in range(3):
        for p in range(n_pos):
            expected = scipy_mahalanobis(x[b, p], mean[p], np.linalg.inv(cov[p]))
            assert ours[b, p] == pytest.approx(expected, rel=1e-10)


def test_unpack_lower_fills_the_lower_triangle_row_by_row():
    packed = torch.arange(1.0, 7.0).view(1, 6)
    expected = torch.tensor([[[1.0, 0, 0], [2, 3, 0], [4, 5, 6]]])
    assert torch.equal(unpack_lower(packed, 3), expected)


def test_store_factor_refuses_values_float16_cannot_hold():
    from padim.errors import PadimError

    packed = torch.tensor([[1.0, -2.5, 6.0e4], [0.5, 0.25, 7.0e4]])  # float16's largest is 65504
    assert store_factor(packed, "float32") is packed
    assert store_factor(packed[:, :2], "float16").tolist() == [[1.0, -2.5], [0.5, 0.25]]
    with pytest.raises(PadimError, match="beyond float16's range"):
        store_factor(packed, "float16")
