"""Paths that are not regular files, and model files changed under a loaded model.

A FIFO, a socket or a device given as a path is refused in one line saying what it is, never opened
(opening a FIFO blocks until a writer comes; /dev/zero never ends); inside a folder such entries are
skipped with a note. A loaded model is built from the file's bytes read once: writing other bytes
into the file, or truncating it, changes nothing it computes (a memory-mapped file did, and a
truncated one killed the process with SIGBUS).

References: scores computed before the file changed (and by a model loaded from a pristine copy),
hashlib for SHA-256, os.stat for what a path is. Every call that could block runs in a thread joined
with a timeout, so a regression fails instead of hanging.
"""

import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST
from padim import PaDiM
from padim.cli import main
from padim.errors import DataError, ModelFileError
from padim.files.safetensors_read import read_file
from padim.pipeline.sources import expand_paths

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="needs FIFOs and /dev/zero (POSIX)")
TIMEOUT = 60


def bounded(call, unblock=None):
    """call() in a thread -> what it returned, or the exception it raised; fails (after opening
    ``unblock``, a FIFO, for writing so the thread can end) when it is still running after TIMEOUT."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        if unblock is not None:
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still blocked after {TIMEOUT} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def images(synthetic_root):
    return sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:3]


@pytest.fixture(scope="module")
def two_models(synthetic_root, tmp_path_factory):
    """Two model files of one configuration, fitted with different seeds."""
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    folder = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        PaDiM(**FAST, seed=seed).fit(train).save(folder / f"v{seed}.safetensors")
    return folder / "v0.safetensors", folder / "v1.safetensors"


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    return path


# ----------------------------------------------------------------------------------------- paths
def test_predict_refuses_a_fifo_and_a_device_saying_what_they_are(two_models, images, fifo, tmp_path):
    model = PaDiM.load(two_models[0], device="cpu")
    with pytest.raises(DataError, match="is a FIFO, not a regular file") as caught:
        bounded(lambda: model.predict([fifo]), unblock=fifo)
    assert str(fifo) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(DataError, match="is a character device, not a regular file"):
        bounded(lambda: model.predict(["/dev/zero"]))
    with pytest.raises(DataError, match="does not exist"):
        bounded(lambda: model.predict([tmp_path / "missing.png"]))


def test_with_errors_recorded_a_fifo_is_an_error_row_not_a_hang(two_models, images, fifo, tmp_path):
    model = PaDiM.load(two_models[0], device="cpu")
    alone = model.predict(images[:2]).scores
    mixed = [images[0], fifo, "/dev/zero", tmp_path / "missing.png", tmp_path, images[1]]
    result = bounded(lambda: model.predict(mixed, errors="record"), unblock=fifo)
    assert list(result.index) == [0, 5]
    np.testing.assert_array_equal(result.scores, alone)
    said = {index: message for index, _, message in result.errors}
    assert sorted(said) == [1, 2, 3, 4]
    assert "is a FIFO, not a regular file" in said[1]
    assert "is a character device, not a regular file" in said[2]
    assert "does not exist" in said[3]
    assert "is a folder, not a regular file" in said[4]
    assert all("\n" not in message for message in said.values())


def test_the_command_line_and_the_api_say_the_same_of_a_path(fifo, tmp_path, images):
    for path, words in ((fifo, "is a FIFO, not a regular file"), (Path("/dev/zero"), "is a character device"),
                        (tmp_path / "missing.png", "does not exist")):
        with pytest.raises(DataError, match=words):
            bounded(lambda: expand_paths([path]), unblock=fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(images[0], folder / "a.png")
    os.mkfifo(folder / "b.png")
    notes = []
    found = bounded(lambda: expand_paths([folder], note=notes.append), unblock=folder / "b.png")
    assert found == [folder / "a.png"]  # the FIFO inside the folder is skipped, with a note
    assert len(notes) == 1 and "b.png (a FIFO)" in notes[0]  # the words files.paths gives every surface


def test_padim_predict_names_a_fifo_in_one_line(two_models, fifo, capsys):
    code = bounded(lambda: main(["predict", "--model", str(two_models[0]), str(fifo)]), unblock=fifo)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and "is a FIFO, not a regular file" in lines[-1] and str(fifo) in lines[-1]


def test_a_model_path_that_is_a_fifo_or_a_device_is_refused_without_blocking(fifo):
    with pytest.raises(ModelFileError, match="is a FIFO, not a regular file"):
        bounded(lambda: PaDiM.load(fifo, device="cpu"), unblock=fifo)
    with pytest.raises(ModelFileError, match="is a character device, not a regular file"):
        bounded(lambda: PaDiM.load("/dev/zero", device="cpu"))


# ----------------------------------------------------------------------------------------- model files
def test_a_loaded_model_never_changes_with_its_file(two_models, images, tmp_path):
    first, second = two_models
    path = tmp_path / "m.safetensors"
    shutil.copy(first, path)
    model = PaDiM.load(path, device="cpu")
    before = model.predict(images).scores
    other = PaDiM.load(second, device="cpu").predict(images).scores
    assert np.abs(before - other).max() > 1e-3 * np.abs(before).max()  # the other bytes score otherwise
    with open(path, "r+b") as handle:  # written in place, as a slow cp or an editor does
        handle.write(second.read_bytes())
        handle.truncate()
    np.testing.assert_array_equal(PaDiM.load(path, device="cpu").predict(images).scores, other)  # the file did change
    np.testing.assert_array_equal(model.predict(images).scores, before)
    os.truncate(path, 100)  # a memory-mapped file would now kill the process (SIGBUS)
    np.testing.assert_array_equal(model.predict(images).scores, before)
    with pytest.raises(ModelFileError, match="truncated"):
        PaDiM.load(path, device="cpu")


def test_a_model_is_built_from_the_bytes_its_sha256_is_of(two_models, images, tmp_path):
    first, _ = two_models
    path = tmp_path / "m.safetensors"
    shutil.copy(first, path)
    source = read_file(path)
    assert source.sha256 == hashlib.sha256(first.read_bytes()).hexdigest()
    path.unlink()  # nothing is read from the file again
    model = PaDiM.load(source, device="cpu")
    np.testing.assert_array_equal(model.predict(images).scores,
                                  PaDiM.load(first, device="cpu").predict(images).scores)


def test_a_file_changed_while_it_is_read_is_refused(two_models, tmp_path, monkeypatch):
    import padim.files.safetensors_read as reading

    path = tmp_path / "m.safetensors"
    shutil.copy(two_models[0], path)
    real = reading._header_from

    def then_appended(*args):  # the file grows after its header was checked: a writer still at work
        found = real(*args)
        with open(path, "ab") as handle:
            handle.write(b"\0" * 10)
        return found

    monkeypatch.setattr(reading, "_header_from", then_appended)
    with pytest.raises(ModelFileError, match="changed while it was read"):
        read_file(path)
