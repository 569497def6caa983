"""Bad input ends in one clear line on stderr and a non-zero exit, never a traceback."""

import subprocess
import sys
import urllib.error

import pytest
from PIL import Image

from padim.cli import main

FIT = ["fit", "--category", "fabric", "--weights", "random", "--image-size", "64", "--device", "cpu"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("WARNING", "note:"))]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_category(synthetic_root, tmp_path, capsys):
    code = main(["fit", "--data-root", str(synthetic_root), "--category", "bottle", "--output", str(tmp_path / "m")])
    assert code == 1
    line = _error_line(capsys)
    assert "category 'bottle' not found" in line and "fabric" in line


def test_missing_data_root(tmp_path, capsys):
    assert main(FIT + ["--data-root", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m")]) == 1
    assert "does not exist" in _error_line(capsys)


def test_empty_train_folder(writable_root, tmp_path, capsys):
    for image in (writable_root / "fabric" / "train" / "good").iterdir():
        image.unlink()
    assert main(FIT + ["--data-root", str(writable_root), "--output", str(tmp_path / "m")]) == 1
    assert "no training images in" in _error_line(capsys)


def test_corrupt_training_image_is_named(writable_root, tmp_path, capsys):
    bad = writable_root / "fabric" / "train" / "good" / "005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert main(FIT + ["--data-root", str(writable_root), "--output", str(tmp_path / "m")]) == 1
    line = _error_line(capsys)
    assert "cannot read image" in line and str(bad) in line
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def model_file(synthetic_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "fabric.safetensors"
    assert main(FIT + ["--data-root", str(synthetic_root), "--output", str(path)]) == 0
    return path


def test_mask_of_the_wrong_size(writable_root, model_file, tmp_path, capsys):
    mask = writable_root / "fabric" / "ground_truth" / "spot" / "000_mask.png"
    Image.new("L", (32, 20)).save(mask)
    capsys.readouterr()
    code = main(["test", "--model", str(model_file), "--data-root", str(writable_root), "--category", "fabric",
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 1
    line = _error_line(capsys)
    assert str(mask) in line and "32x20" in line and "64x64" in line


def test_defect_without_mask_is_reported_not_dropped(writable_root, model_file, tmp_path, capsys):
    import json

    (writable_root / "fabric" / "ground_truth" / "spot" / "001_mask.png").unlink()
    capsys.readouterr()
    assert main(["test", "--model", str(model_file), "--data-root", str(writable_root), "--category", "fabric",
                 "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "1 defect image(s) have no mask" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["defects_without_mask"] == [str(writable_root / "fabric" / "test" / "spot" / "001.png")]
    assert metrics["n_test_images"] == 10  # still counted for image metrics


@pytest.mark.parametrize("damage", ["half", "not_a_model", "png"])
def test_damaged_or_wrong_model_file(model_file, synthetic_root, tmp_path, capsys, damage):
    bad = tmp_path / "bad.safetensors"
    data = model_file.read_bytes()
    if damage == "half":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "not_a_model":
        from safetensors.torch import save_file
        import torch

        save_file({"weight": torch.zeros(2)}, str(bad))
    else:
        Image.new("RGB", (8, 8)).save(bad, format="PNG")
    code = main(["predict", "--model", str(bad), str(synthetic_root / "fabric" / "test" / "good" / "000.png")])
    assert code == 1
    line = _error_line(capsys)
    assert str(bad) in line
    assert {"half": "truncated", "not_a_model": "not a padim model", "png": "corrupted"}[damage] in line


def test_missing_model_file(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "none.safetensors"), str(tmp_path)]) == 1
    assert "does not exist" in _error_line(capsys)


def test_imagenet_weights_unavailable_offline_says_how_to_provide_them(synthetic_root, tmp_path, capsys, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code = main(["fit", "--data-root", str(synthetic_root), "--category", "fabric", "--backbone", "resnet18",
                 "--image-size", "64", "--device", "cpu", "--output", str(tmp_path / "m")])
    assert code == 1
    line = _error_line(capsys)
    assert "ResNet18_Weights.IMAGENET1K_V1" in line and "--weights PATH" in line and "checkpoints" in line


def test_weights_file_that_does_not_fit(synthetic_root, tmp_path, capsys):
    import torch

    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    code = main(FIT[:3] + ["--weights", str(weights), "--image-size", "64", "--device", "cpu",
                           "--data-root", str(synthetic_root), "--output", str(tmp_path / "m")])
    assert code == 1
    assert "do not fit resnet18" in _error_line(capsys)


def test_cuda_asked_for_where_there_is_none(synthetic_root, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = FIT[:-1] + ["cuda", "--data-root", str(synthetic_root), "--output", str(tmp_path / "m")]
    assert main(args) == 1
    assert "CUDA is not available" in _error_line(capsys)


def test_real_process_prints_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "padim", "fit", "--data-root", str(tmp_path), "--category", "x",
                          "--output", str(tmp_path / "m")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == f"padim fit: error: category 'x' not found in {tmp_path}; no category folders found there"
