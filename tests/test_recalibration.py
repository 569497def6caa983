"""Recalibration without refitting (padim recalibrate, PaDiM.recalibrate): thresholds, p-values and the
file's record of the pictures, against a by-hand split-conformal computation from the new pictures'
scores; the Gaussians and scores unchanged; all or nothing."""

import math

import numpy as np
import pytest
from PIL import Image

from padim import DataError, PaDiM
from padim.cli import main

from conftest import FAST

FAST_CLI = ["--batch-size", "8", "--device", "cpu"]


def _by_hand(scores: np.ndarray, maps: np.ndarray, alpha: float, pixel_fpr: float):
    """The split-conformal image threshold (next float above the k-th smallest score, k = ceil((n + 1)
    (1 - alpha)), the largest when k > n) and the pixels' (1 - pixel_fpr) quantile."""
    ordered = np.sort(scores.astype(np.float64))
    k = min(math.ceil((len(ordered) + 1) * (1 - alpha) - 1e-9), len(ordered))
    return float(np.nextafter(ordered[k - 1], np.inf)), float(np.quantile(maps.astype(np.float64), 1 - pixel_fpr))


@pytest.fixture(scope="module")
def fitted(synthetic_root):
    """A model fitted (without calibration: 12 images) on the synthetic category, and 16 good pictures."""
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    good = train + sorted((synthetic_root / "fabric" / "test" / "good").glob("*.png"))
    return PaDiM(**FAST).fit(train), good


def test_thresholds_and_p_values_equal_a_by_hand_computation_and_scores_do_not_move(fitted, tmp_path):
    model, good = fitted
    pictures = good[:14]
    before = model.predict(good)
    scores = before.scores[:14]
    recalibrated = PaDiM.load(_saved(model, tmp_path / "m.safetensors"), device="cpu").recalibrate(
        pictures, target_fpr=0.2, target_pixel_fpr=0.01)
    image, pixel = _by_hand(scores, before.maps[:14], 0.2, 0.01)
    assert recalibrated.image_threshold_ == image
    assert recalibrated.pixel_threshold_ == pytest.approx(pixel, rel=1e-5)
    after = recalibrated.predict(good)
    np.testing.assert_array_equal(after.scores, before.scores)  # same Gaussians, same scores
    np.testing.assert_array_equal(after.labels, before.scores.astype(np.float64) >= image)
    at_least = np.array([(scores >= s).sum() for s in before.scores])
    np.testing.assert_allclose(after.p_values, (1 + at_least) / (len(scores) + 1))
    assert recalibrated.threshold_source_ == "calibration: target FPR 20% on 14 good images"
    path = tmp_path / "recalibrated.safetensors"
    recalibrated.save(path)
    loaded = PaDiM.load(path, device="cpu")
    assert loaded.image_threshold_ == image and loaded.calibration_.n == 14
    assert loaded.calibrated_by_ == "padim recalibrate" and loaded.calibration_date_
    assert loaded.calibration_images_ == [str(p) for p in pictures]
    assert len(loaded.calibration_images_sha256_) == 14


def test_too_few_pictures_use_the_highest_score_and_say_so(fitted):
    model, good = fitted
    recalibrated = _copy(model).recalibrate(good[:5], target_fpr=0.05)
    assert recalibrated.image_threshold_ == float(np.nextafter(np.float64(model.predict(good[:5]).scores.max()), np.inf))
    assert "guarantee only 16.7%" in recalibrated.threshold_source_


def test_an_unreadable_picture_changes_nothing(fitted, tmp_path):
    model, good = fitted
    copy = _copy(model).recalibrate(good[:10], target_fpr=0.2)
    before = {key: getattr(copy, key) for key in vars(copy) if key.endswith("_")}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(DataError, match="broken.png"):
        copy.recalibrate([*good[10:13], broken], target_fpr=0.1)
    after = {key: getattr(copy, key) for key in vars(copy) if key.endswith("_")}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert copy.target_fpr == 0.2 and copy.calibration_.n == 10


def test_cli_writes_a_new_file_and_leaves_the_model_alone(fitted, tmp_path, capsys):
    model, good = fitted
    source = _saved(model, tmp_path / "model.safetensors")
    original = source.read_bytes()
    folder = tmp_path / "new-good"
    folder.mkdir()
    for i, picture in enumerate(good):  # a change on the line: every picture 20 % brighter
        pixels = np.asarray(Image.open(picture).convert("RGB"), dtype=np.float64)
        Image.fromarray(np.clip(pixels * 1.2, 0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    output = tmp_path / "recalibrated.safetensors"
    assert main(["recalibrate", "--model", str(source), "--add", str(folder), "--output", str(output),
                 "--target-fpr", "0.1", *FAST_CLI]) == 0
    assert "recalibrated on 16 good pictures" in capsys.readouterr().out
    assert source.read_bytes() == original
    pictures = sorted(folder.glob("*.png"))
    result = model.predict(pictures)
    image, _ = _by_hand(result.scores, result.maps, 0.1, 0.01)
    assert PaDiM.load(output, device="cpu").image_threshold_ == image
    assert main(["recalibrate", "--model", str(source), "--add", str(folder), "--output", str(source), *FAST_CLI]) == 1
    assert "--output" in capsys.readouterr().err and source.read_bytes() == original
    assert main(["recalibrate", "--model", str(source), "--add", str(folder), "--output", str(tmp_path / "x.safetensors"),
                 "--target-fpr", "1.5"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def _saved(model, path):
    model.save(path)
    return path


def _copy(model):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        return PaDiM.load(_saved(model, Path(folder) / "m.safetensors"), device="cpu")


def test_an_int8_export_of_a_recalibrated_model_is_refused_saying_why():
    """int8 thresholds are recomputed on the fit's held-out training pictures: a recalibrated model's
    thresholds came from other pictures, so its int8 export is refused in one line, before any work."""
    from padim.deploy.quantize import held_out_split
    from padim.errors import PadimError

    metadata = {"calibrated_by": "padim recalibrate", "calibration_date": "2026-12-07T10:00:00+00:00",
                "n_train_images": 10, "n_calibration_images": 20, "config": {"seed": 0}}
    with pytest.raises(PadimError, match="recalibration .padim recalibrate") as refused:
        held_out_split(metadata, [f"{i}.png" for i in range(30)])
    assert "\n" not in str(refused.value)
