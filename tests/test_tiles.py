"""Large pictures and regions that do not count (issue 22): tile geometry and stitching against
NumPy references, tiled models through every surface, and an ignore mask that provably removes its
region (a defect painted only inside it changes nothing; the same defect outside does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim import PaDiM
from padim.cli import main
from padim.core.tiling import stitch, stitch_weights, tile_boxes, tile_starts
from padim.errors import PadimError
from padim.jobs.metrics import pixel_metrics

TILED = dict(backbone="resnet18", weights="random", image_size=(96, 64), tile=48, tile_overlap=8, n_features=16,
             batch_size=4, device="cpu")


# ----------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("length, tile, overlap", [(100, 32, 8), (64, 64, 0), (97, 40, 39), (1264, 256, 32)])
def test_tiles_cover_every_pixel_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start : start + tile] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] == length - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # never a gap wider than the stride


def test_stitching_is_the_weighted_mean_of_the_tiles():
    size, tile, overlap = (70, 50), 32, 10
    boxes = tile_boxes(size, tile, overlap)
    maps = torch.rand(2 * len(boxes), tile, tile, generator=torch.Generator().manual_seed(0))
    window, inverse = stitch_weights(size, boxes, tile, overlap)
    got = stitch(maps, boxes, size, window, inverse).numpy()
    # the reference: accumulate weighted values and weights pixel by pixel in NumPy
    ramp = np.minimum(np.minimum(np.arange(tile) + 1, tile - np.arange(tile)) / (overlap + 1), 1.0)
    weight = np.outer(ramp, ramp)
    for b in range(2):
        total, weights = np.zeros(size), np.zeros(size)
        for t, (top, left) in enumerate(boxes):
            total[top : top + tile, left : left + tile] += weight * maps[b * len(boxes) + t].numpy()
            weights[top : top + tile, left : left + tile] += weight
        np.testing.assert_allclose(got[b], total / weights, rtol=1e-5)


# ----------------------------------------------------------------------------------------- tiled models
@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """44 smooth 96 x 64 (H x W) greyscale pictures with a faint texture, and a defect picture."""
    root = tmp_path_factory.mktemp("tall")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(44):
        base = 120 + 20 * np.sin(np.arange(96)[:, None] / 6.0 + i * 0.05) + rng.normal(0, 3, (96, 64))
        path = root / "train" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return root, paths


@pytest.mark.parametrize("statistics", ["position", "shared"])
def test_a_tiled_model_scores_alike_in_every_engine_and_after_a_reload(pictures, statistics, tmp_path):
    root, paths = pictures
    model = PaDiM(**TILED, tile_statistics=statistics).fit(paths)
    expected_grid = (6 * 12, 12) if statistics == "position" else (12, 12)  # 3 x 2 tiles of 48 px, stride 40
    assert model.feature_hw_ == expected_grid and model.calibration_ is not None
    result = model.predict(paths[:3], original_resolution=True)
    assert [m.shape for m in result.maps] == [(96, 64)] * 3
    model.save(tmp_path / "m.safetensors")
    again = PaDiM.load(tmp_path / "m.safetensors", device="cpu").predict(paths[:3])
    np.testing.assert_array_equal(again.scores, result.scores)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from padim.deploy.export import export_model
    from padim.runtime import ExportedModel

    export_model(model, tmp_path / "onnx", "onnx")
    exported = ExportedModel(tmp_path / "onnx", "onnxruntime").predict(paths[:3])
    np.testing.assert_allclose(exported.maps, again.maps, rtol=1e-4, atol=1e-4 * float(again.maps.max()))


@pytest.mark.parametrize("group", [1, 4])  # 6 tiles: groups of one, and 4 + 2
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("statistics", ["position", "shared"])
def test_scoring_tile_by_tile_equals_every_tile_at_once(pictures, statistics, masked, group, monkeypatch):
    """The eager tiled path embeds, scores and stitches tiles group by group (in place); with groups
    of one tile it gives the maps of the path export traces (all tiles embedded at once, stitched by
    padding each tile to the picture), and the map's maximum is the score."""
    import padim.core.scorer as scorer_module

    root, paths = pictures
    ignore = np.zeros((96, 64), dtype=bool)
    ignore[30:70, 20:50] = True  # across tile borders
    model = PaDiM(**TILED, tile_statistics=statistics, calibration_fraction=0,
                  ignore_mask=ignore if masked else None).fit(paths[:12])
    pixels = torch.as_tensor(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[12:16]]))
    scorer = model.scorer_
    with torch.inference_mode():
        all_at_once, _ = scorer.score_embeddings(scorer.embedder(pixels))
        all_at_once = all_at_once.clone()
        per_tile = len(pixels) * scorer.embedder.d * 4 * (48 // 4) ** 2  # tile_groups' estimate of one tile
        monkeypatch.setattr(scorer_module, "TILE_GROUP_BYTES", group * per_tile)
        one_by_one, scores = scorer(pixels)
    np.testing.assert_allclose(one_by_one.numpy(), all_at_once.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scores.numpy(), one_by_one.flatten(1).amax(dim=1).numpy())
    if masked:
        assert not one_by_one[:, ignore].any()


def test_tile_options_are_checked_before_any_work():
    with pytest.raises(PadimError, match="`tile` must be"):
        PaDiM(**{**TILED, "tile": 200}).fit([np.zeros((8, 8, 3), np.uint8)] * 2)
    with pytest.raises(PadimError, match="`tile_overlap`"):
        PaDiM(**{**TILED, "tile_overlap": 48}).fit([np.zeros((8, 8, 3), np.uint8)] * 2)
    with pytest.raises(PadimError, match="`tile_statistics`"):
        PaDiM(**TILED, tile_statistics="everywhere").fit([np.zeros((8, 8, 3), np.uint8)] * 2)


def test_the_cli_fits_tests_predicts_exports_and_serves_a_tiled_model(synthetic_root, tmp_path, capsys):
    model = tmp_path / "tiled.safetensors"
    assert main(["fit", "--data-root", str(synthetic_root), "--category", "fabric", "--weights", "random",
                 "--image-size", "64x48", "--tile", "32", "--tile-statistics", "shared", "--output", str(model)]) == 0
    assert "tiles of 32 px per picture (shared statistics)" in capsys.readouterr().out
    assert main(["test", "--model", str(model), "--data-root", str(synthetic_root), "--category", "fabric",
                 "--output", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["image_AUROC"] is not None
    image = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[0]
    assert main(["predict", "--model", str(model), str(image), "--output", str(tmp_path / "pics")]) == 0
    heatmap = next((tmp_path / "pics").rglob("*_heatmap.png"))
    assert Image.open(heatmap).size == Image.open(image).size  # at the picture's own geometry
    pytest.importorskip("pyarrow", reason="the ray extra is not installed (pip install '.[ray]')")
    from padim.cluster import ray_scoring

    loaded = PaDiM.load(model, device="cpu")
    rows = ray_scoring.score_files(loaded, [str(image)], [str(image)], loaded.operating_point()).to_pylist()
    assert rows[0]["score"] == pytest.approx(loaded.predict([image]).scores[0], rel=1e-6)  # what Ray's actors run


# ----------------------------------------------------------------------------------------- ignore masks
def _with_square(picture: np.ndarray, top: int, left: int) -> np.ndarray:
    out = picture.copy()
    out[top : top + 10, left : left + 10] = 255  # a bright square: a defect
    return out


def test_a_defect_inside_the_ignored_region_changes_nothing_outside_it_does(pictures, tmp_path):
    root, paths = pictures
    roi = np.zeros((96, 64), dtype=bool)
    roi[:40, :] = True  # the upper part never counts
    Image.fromarray(roi.astype(np.uint8) * 255).resize((128, 192)).save(tmp_path / "roi.png")  # another size
    model = PaDiM(backbone="resnet18", weights="random", image_size=(96, 64), n_features=16, device="cpu",
                  ignore_mask=tmp_path / "roi.png").fit(paths)
    clean = np.asarray(Image.open(paths[0]).convert("RGB"))
    inside, outside = _with_square(clean, 5, 20), _with_square(clean, 70, 20)
    scores = model.predict([clean, inside, outside]).scores
    assert scores[1] == pytest.approx(scores[0], rel=1e-6)
    assert scores[2] > scores[0] * 1.05
    assert model.predict([inside]).maps[0][:40].max() == 0  # no pixel of the region can reach a threshold
    model.save(tmp_path / "m.safetensors")
    loaded = PaDiM.load(tmp_path / "m.safetensors", device="cpu")
    np.testing.assert_array_equal(loaded.ignore_mask_.numpy(), roi)
    np.testing.assert_array_equal(loaded.predict([clean, inside, outside]).scores, scores)


def test_ignored_pixels_are_left_out_of_the_pixel_metrics():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 5:9, 5:9] = masks[1, 12:16, 2:6] = True
    maps = rng.random((3, 20, 20)) + masks * 0.5
    valid = np.ones((20, 20), dtype=bool)
    valid[:, 15:] = False
    maps[:, 15:] = 99.0  # huge scores where nothing counts: they must not matter
    got = pixel_metrics(masks, maps, valid=valid)["pixel_AUROC"]
    assert got == pytest.approx(roc_auc_score(masks[:, valid].ravel(), maps[:, valid].ravel()), rel=1e-9)
