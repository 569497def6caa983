"""Embeddings: channel subset and multi-layer concatenation, against a plain reference."""

import numpy as np
import torch

from padim.core.features import embed, random_channel_subset


def test_channel_subset_is_seeded_sorted_and_distinct():
    a = random_channel_subset(448, 100, seed=0)
    assert torch.equal(a, random_channel_subset(448, 100, seed=0))
    assert not torch.equal(a, random_channel_subset(448, 100, seed=1))
    assert len(set(a.tolist())) == 100 and a.min() >= 0 and a.max() < 448
    assert torch.equal(a, a.sort().values)


def test_embed_equals_upsample_concatenate_then_select():
    rng = np.random.default_rng(0)
    maps = [torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in [(2, 4, 8, 8), (2, 6, 4, 4), (2, 5, 2, 2)]]
    idx = torch.tensor([0, 3, 4, 7, 9, 10, 14])

    # reference: every map repeated to 8 x 8 (nearest = each value copied into its block), all channels
    full = np.concatenate([np.kron(m.numpy(), np.ones((1, 1, 8 // m.shape[2], 8 // m.shape[3]))) for m in maps], axis=1)
    expected = full[:, idx.numpy()].transpose(0, 2, 3, 1)  # (B, h, w, d)

    ours = embed([m.contiguous(memory_format=torch.channels_last) for m in maps], idx)
    assert ours.shape == (2, 8, 8, 7)
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_embed_with_grids_that_are_not_whole_multiples_matches_nearest_upsampling():
    # e.g. a 250-pixel input: ResNet grids 63, 32, 16; nearest picks source index floor(i * in / out)
    rng = np.random.default_rng(1)
    maps = [torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in [(1, 3, 7, 7), (1, 4, 4, 3)]]
    idx = torch.tensor([1, 2, 3, 6])
    rows, cols = (np.arange(7) * 4) // 7, (np.arange(7) * 3) // 7
    deep = maps[1].numpy()[:, :, rows][:, :, :, cols]
    full = np.concatenate([maps[0].numpy(), deep], axis=1)
    expected = full[:, idx.numpy()].transpose(0, 2, 3, 1)

    out = torch.full((2, 7, 7, 4), float("nan"))
    ours = embed(maps, idx, out=out[1:])  # writes into a slice of a larger buffer
    np.testing.assert_array_equal(ours.numpy(), expected)
    np.testing.assert_array_equal(out[1].numpy(), expected[0])
    assert torch.isnan(out[0]).all()
