"""Issue 23 at the command line: ``padim predict`` runs a drift alarm over its scores in input order
(``drift_log10`` on every JSON line, one stderr line when an alarm fires), and ``padim serve``'s
line options are checked in one line before anything loads.

References: ``PaDiM.predict`` for the scores, a ``DriftMonitor`` fed by hand (its guarantee is tested
against simulation in tests/test_drift.py), and the pictures' ground truth.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST
from padim import PaDiM
from padim.cli import main
from padim.monitor.drift import DriftMonitor

TILES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "train" / "good"


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A calibrated model of 120 magnetic_tile pictures; 30 other good pictures, then 50 rotated by
    10 degrees, as files in that order; and a broken file among the first ones."""
    if not TILES.is_dir():
        pytest.skip(f"{TILES} is not there")
    paths = sorted(TILES.glob("*.jpg"))
    order = np.random.default_rng(0).permutation(len(paths))
    folder = tmp_path_factory.mktemp("line")
    PaDiM(**{**FAST, "batch_size": 32}, calibration_fraction=0.3).fit([paths[i] for i in order[:120]]).save(
        folder / "tile.safetensors")
    files = []
    for k, i in enumerate(order[120:200]):
        picture = Image.open(paths[i]).convert("RGB")
        name = folder / (f"{k:03d}-good.png" if k < 30 else f"{k:03d}-rotated.png")
        (picture if k < 30 else picture.rotate(10)).save(name)
        files.append(name)
    broken = folder / "005-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder / "tile.safetensors", files, broken


def run(capsys, *args):
    code = main(["predict", *map(str, args), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, [json.loads(x) for x in captured.out.splitlines()], captured.err


def test_predict_alarms_on_rotated_pictures_in_input_order(line, capsys):
    model_file, files, broken = line
    inputs = files[:5] + [broken] + files[5:]
    code, records, err = run(capsys, "--model", model_file, *inputs)
    assert code == 1 and len(records) == len(inputs) and "error" in records[5]
    scored = [r for r in records if "score" in r]
    reference = PaDiM.load(model_file, device="cpu")
    np.testing.assert_allclose([r["score"] for r in scored], reference.predict(files).scores, rtol=1e-5)
    monitor = DriftMonitor(reference.calibration_.image_scores, 0.01, reference.target_fpr_, seed=0)
    first = {}
    by_hand = []
    for position, record in enumerate(records):
        if "score" not in record:
            continue
        state = monitor.update([record["score"]])
        by_hand.append(state["streams"]["all"]["martingale"]["log10"])
        for stream in state["new_alarms"]:
            first[stream] = position
    np.testing.assert_allclose([r["drift_log10"] for r in scored], by_hand, rtol=1e-12)
    assert set(first) == {"all", "good"} and all(position > 30 for position in first.values())  # not while calm
    alarms = [x for x in err.splitlines() if x.startswith("drift alarm")]
    assert len(alarms) == 2
    for stream, position in first.items():
        (said,) = [x for x in alarms if x.startswith(f"drift alarm: stream {stream} at image {position} ")]
        assert str(inputs[position]) in said and "rotated" in str(inputs[position])
    # the good pictures alone: no alarm; drift_log10 on every line
    code, records, err = run(capsys, "--model", model_file, *files[:30])
    assert code == 0 and "drift alarm" not in err and all(r["drift_log10"] < 2 for r in records)


def test_predict_without_calibration_has_no_drift_and_the_delta_is_checked(line, synthetic_root, tmp_path, capsys):
    model_file, files, _ = line
    plain = tmp_path / "plain.safetensors"
    PaDiM(**FAST).fit(sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))).save(plain)
    code, records, err = run(capsys, "--model", plain, *files[:3])
    assert code == 0 and [r["drift_log10"] for r in records] == [None] * 3
    for bad in ("0", "1", "1.5", "-0.1"):
        code, _, err = run(capsys, "--model", model_file, files[0], "--drift-delta", bad)
        assert code == 1 and err.count("\n") == 1 and "--drift-delta must be in (0, 1)" in err, err
    # a looser delta alarms no later
    _, strict, _ = run(capsys, "--model", model_file, *files[25:60])
    _, loose, err = run(capsys, "--model", model_file, *files[25:60], "--drift-delta", "0.2")
    assert [r["drift_log10"] for r in loose] == [r["drift_log10"] for r in strict] and "drift alarm" in err


@pytest.mark.parametrize("options, words", [
    (["--drift-delta", "2"], "--drift-delta must be in (0, 1)"),
    (["--webhook", "ftp://example.org/x"], "--webhook must be an http:// or https:// URL"),
    (["--keep-max-gb", "1"], "--keep-max-gb is the limit of --keep-flagged"),
    (["--keep-flagged", "FLAGGED", "--keep-max-gb", "0"], "--keep-max-gb must be a number above 0"),
    (["--reload-interval", "0.01"], "--reload-interval must be 0 (off) or at least 0.1"),
    (["--log-decisions", "/proc/padim-log"], "--log-decisions"),
    (["--log-decisions", "LOG", "--keep-flagged", "LOG"], "two different folders"),
])
def test_serve_line_options_are_checked_in_one_line(line, tmp_path, capsys, options, words):
    model_file = line[0]
    options = [str(tmp_path / o) if o in ("FLAGGED", "LOG") else o for o in options]
    assert main(["serve", str(model_file), *options]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
