"""The scoring pipeline every surface shares (issue 19): folders searched recursively, one bad file
among good ones recorded and the others scored, the same policy in Python and on the command line,
and records that are strict JSON.

References are independent of the code under test: ``os.walk`` for the folder search, a model's
scores of the good files alone for the scores of a batch that holds a bad one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim import PaDiM
from padim.cli import main
from padim.errors import DataError, PadimError
from padim.pipeline.records import json_line
from padim.pipeline.sources import expand_paths, find_images

from conftest import FAST


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, synthetic_root):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    train = sorted((synthetic_root / "fabric" / "train" / "good").iterdir())[:8]
    PaDiM(**FAST, calibration_fraction=0).fit(train).save(path)
    return path


@pytest.fixture
def nested(tmp_path):
    """archive/{top.png, cam1/day1/a.png, cam1/day2/b.png, cam2/c.png, .hidden/h.png} + a link loop."""
    root = tmp_path / "archive"
    files = [_png(root / "top.png", 0), _png(root / "cam1" / "day1" / "a.png", 1),
             _png(root / "cam1" / "day2" / "b.png", 2), _png(root / "cam2" / "c.png", 3)]
    _png(root / ".hidden" / "h.png", 4)
    os.symlink(root, root / "cam2" / "loop")  # a link back up the tree
    return root, files


def test_folders_are_searched_recursively_once_in_a_stable_order(nested):
    root, files = nested
    walked = []
    for folder, subfolders, names in os.walk(root):  # the reference: os.walk without following links
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        walked += [Path(folder) / n for n in sorted(names) if n.endswith(".png")]
    found = find_images(root)
    assert found == walked and sorted(found) == sorted(files)
    assert expand_paths([root, files[1]]) == found  # a file also named by hand is kept once


def test_an_empty_folder_tree_is_refused(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in folder"):
        expand_paths([tmp_path / "empty"])


def test_predict_records_a_bad_file_and_scores_the_others(model_file, nested, tmp_path):
    root, files = nested
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = PaDiM.load(model_file, device="cpu", batch_size=2)
    alone = model.predict(files)  # the reference: the good files without the bad one
    mixed = [files[0], bad, *files[1:]]
    with pytest.raises(DataError, match="bad.png"):
        model.predict(mixed)  # errors="raise", the default, names the file
    recorded = model.predict(mixed, errors="record")
    assert recorded.index.tolist() == [0, 2, 3, 4]
    assert [(i, name) for i, name, _ in recorded.errors] == [(1, str(bad))]
    np.testing.assert_allclose(recorded.scores, alone.scores, rtol=1e-6)
    with pytest.raises(PadimError, match="errors must be"):
        model.predict(files, errors="ignore")


def test_cli_predict_one_line_per_file_errors_included_and_exit_1(model_file, nested, tmp_path, capsys):
    root, files = nested
    (root / "cam1" / "day2" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "pictures"
    code = main(["predict", "--model", str(model_file), str(root), "--output", str(out)])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 1
    assert [line["path"] for line in lines if "score" in line] == [str(f) for f in find_images(root) if
                                                                    f.name != "broken.jpg"]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.jpg") and "cannot read" in errors[0]["error"]
    assert "scored 4, 1 errors" in captured.err
    # pictures mirror the subfolders, one per scored file, none for the broken one
    drawn = sorted(p.relative_to(out) for p in out.rglob("*_heatmap.png"))
    assert drawn == sorted(Path(f"{f.relative_to(root)}_heatmap.png") for f in files)
    assert main(["predict", "--model", str(model_file), str(files[0])]) == 0


def test_json_lines_never_hold_nan():
    line = json_line({"score": float("nan"), "p": [1.0, math.inf], "nested": {"x": -math.inf}})
    assert json.loads(line) == {"score": None, "p": [1.0, None], "nested": {"x": None}}
