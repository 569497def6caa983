"""Model files and JSON outputs: checksum, validation against the tensors, umask, full disk, stale
temporaries. References are the file's bytes (hashlib, json), never padim.files.safetensors_io's own output."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAST
from modelfile_helpers import padim_header, rewrite, sha256_with_digest_zeroed, split
from padim.files import atomic
from padim.settings.validation import validate_config_dict
from padim.errors import ModelFileError, PadimError
from padim.core.estimator import PaDiM
from padim.jobs.runs import write_json_atomic


@pytest.fixture(scope="module")
def fitted(synthetic_root, tmp_path_factory):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:4]
    model = PaDiM(**FAST, n_features=10).fit(train)
    path = tmp_path_factory.mktemp("files") / "fabric.safetensors"
    model.save(path)
    return model, path, images, model.predict(images).scores


def _one_line_refusal(path):
    with pytest.raises(ModelFileError) as info:
        PaDiM.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


# ----------------------------------------------------------------------------------------- checksum
def test_checksum_is_sha256_of_the_file_with_its_digest_zeroed(fitted):
    data = fitted[1].read_bytes()
    stored = padim_header(data)["checksum"]
    assert stored == sha256_with_digest_zeroed(data)


def test_file_stays_plain_safetensors(fitted):
    model, path, _, _ = fitted
    tensors = load_file(str(path))
    assert torch.equal(tensors["mean"], model.mean_.cpu())
    assert torch.equal(tensors["precision_factor_packed"], model.precision_factor_packed_.cpu())
    assert torch.equal(tensors["channel_idx"], model.channel_idx_.cpu())


@pytest.mark.parametrize("where", ["length", "header_json", "header_padim", "checksum_digit", "mean", "factor_last_byte"])
def test_a_single_flipped_bit_is_refused(fitted, tmp_path, where):
    data = bytearray(fitted[1].read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header, _ = split(bytes(data))
    start = 8 + header_len
    offset = {
        "length": 2,
        "header_json": 8 + bytes(data).index(b'"dtype"') - 8 + 3,
        "header_padim": 8 + bytes(data[8:]).index(b"n_features") + 2,
        "checksum_digit": bytes(data).rindex(b"sha256:") + 7 + 10,
        "mean": start + header["mean"]["data_offsets"][0] + 13,
        "factor_last_byte": start + header["precision_factor_packed"]["data_offsets"][1] - 1,
    }[where]
    data[offset] ^= 0x04
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    _one_line_refusal(bad)


def test_file_without_checksum_from_before_still_loads(fitted, tmp_path):
    """Files written before the checksum (safetensors' own writer, no checksum or layout) load as before."""
    model, path, images, scores = fitted
    meta = padim_header(path.read_bytes())
    for key in ("checksum", "layout"):
        meta.pop(key)
    meta["format_version"] = 1  # what they said
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"padim": json.dumps(meta)})
    np.testing.assert_array_equal(PaDiM.load(old, device="cpu").predict(images).scores, scores)


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("edit", [
    lambda m: m["config"].update(backbone="resnet50"),  # same grid and d: only the layout says otherwise
    lambda m: m["config"].update(backbone="efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"]),
    lambda m: m["config"].update(image_size=[128, 128]),
    lambda m: m["config"].update(n_features=11),
    lambda m: m["config"].update(layers=["layer1", "layer9"]),
    lambda m: m["config"].update(sigma=-1.0),
    lambda m: m["config"].update(std=[0.2, 0.0, 0.2]),
    lambda m: m["config"].update(crop=[96, 96]),
    lambda m: m["config"].update(factor_dtype="float64"),
    lambda m: m["config"].update(seed="0"),
    lambda m: m.update(feature_hw=[8, 32]),
    lambda m: m.update(image_threshold="high"),
    lambda m: m.update(pixel_threshold=[1.0]),
])
@pytest.mark.parametrize("checksum", ["recompute", "drop"])
def test_header_that_contradicts_itself_or_the_tensors_is_refused(fitted, tmp_path, edit, checksum):
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(rewrite(fitted[1].read_bytes(), edit, checksum))
    _one_line_refusal(bad)


def test_channel_indices_out_of_order_are_refused(fitted, tmp_path):
    tensors = load_file(str(fitted[1]))
    tensors["channel_idx"] = tensors["channel_idx"].flip(0).contiguous()
    meta = padim_header(fitted[1].read_bytes())
    meta.pop("checksum")
    meta["format_version"] = 1  # as a file from before the checksum, so that the contents are what is checked
    bad = tmp_path / "idx.safetensors"
    save_file(tensors, str(bad), metadata={"padim": json.dumps(meta)})
    assert "channel_idx" in _one_line_refusal(bad)


def test_nan_in_the_mean_is_refused(fitted, tmp_path):
    tensors = load_file(str(fitted[1]))
    tensors["mean"][3, 2] = float("nan")
    meta = padim_header(fitted[1].read_bytes())
    meta.pop("checksum")
    meta["format_version"] = 1  # as a file from before the checksum, so that the contents are what is checked
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata={"padim": json.dumps(meta)})
    assert "NaN" in _one_line_refusal(bad)


def test_absurd_shapes_are_refused_before_any_tensor_is_read(fitted, tmp_path, monkeypatch):
    import padim.files.safetensors_io

    data = fitted[1].read_bytes()
    header, body = split(data)
    header["mean"]["shape"] = [1 << 40, 1 << 20]
    from modelfile_helpers import assemble

    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(assemble(header, body))
    monkeypatch.setattr(padim.files.safetensors_io, "tensors_of", lambda *a, **k: pytest.fail("tensors were read"))
    assert "does not match" in _one_line_refusal(bad)


def test_validate_config_dict_accepts_the_saved_config(fitted):
    model, path, _, _ = fitted
    assert validate_config_dict(padim_header(path.read_bytes())["config"]) == model.config_


@pytest.mark.parametrize("field, value", [("image_size", [64]), ("image_size", [0, 64]), ("epsilon", -0.1),
                                          ("sigma", float("nan")), ("epsilon", 10 ** 400), ("mean", [0.5, 0.5]),
                                          ("n_features", True), ("backbone", "vgg16"), ("extra", 1)],
                         ids=["size1", "size0", "eps-neg", "sigma-nan", "eps-huge", "mean2", "d-bool", "vgg", "extra"])
def test_validate_config_dict_refuses(fitted, field, value):
    config = padim_header(fitted[1].read_bytes())["config"]
    config[field] = value
    with pytest.raises(ModelFileError):
        validate_config_dict(config)


# ----------------------------------------------------------------------------------------- umask
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_users_umask(fitted, tmp_path, mask):
    old = os.umask(mask)
    try:
        fitted[0].save(tmp_path / "m.safetensors")
        write_json_atomic(tmp_path / "out" / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "out" / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------------------------- full disk
def _temporaries(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_is_one_line_and_keeps_the_previous_model(fitted, tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous model")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(ModelFileError) as info:
        fitted[0].save(target)
    assert "no space left" in str(info.value) and str(target) in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == b"previous model"
    assert _temporaries(tmp_path) == []
    with pytest.raises(PadimError, match="no space left"):
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    assert _temporaries(tmp_path) == [] and not (tmp_path / "metrics.json").exists()


def test_file_size_limit_in_a_real_process(fitted, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG): one line, old file intact, no temporary."""
    model_path = tmp_path / "m.safetensors"
    model_path.write_bytes(fitted[1].read_bytes())
    script = f"""
import resource, signal, sys
from padim.core.estimator import PaDiM
from padim.errors import PadimError
model = PaDiM.load({str(model_path)!r}, device="cpu")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    model.save({str(model_path)!r})
except PadimError as exc:
    print("ERROR:", exc)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stderr
    assert len(lines) == 1 and lines[0].startswith("ERROR: cannot write model file") and "file too large" in lines[0]
    assert model_path.read_bytes() == fitted[1].read_bytes()
    assert _temporaries(tmp_path) == []


# ----------------------------------------------------------------------------------------- stale temporaries
def test_temporary_of_a_killed_writer_is_removed_by_the_next_write(fitted, tmp_path):
    target = tmp_path / "m.safetensors"
    script = f"""
import time
from padim.files.atomic import atomic_write
def write(handle):
    handle.write(b"x" * 1000); handle.flush(); print("ready", flush=True); time.sleep(60)
atomic_write({str(target)!r}, write)
"""
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert writer.stdout.readline().strip() == "ready"
    writer.kill()  # kill -9: no cleanup runs
    writer.wait()
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.safetensors.")
    fitted[0].save(target)
    assert _temporaries(tmp_path) == []
    PaDiM.load(target, device="cpu")


def test_temporaries_of_live_or_remote_writers_are_kept(fitted, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = atomic._host_tag()
        live = tmp_path / f".m.safetensors.{host}-{sleeper.pid}-aaaa.tmp"  # another writer, running now
        remote = tmp_path / ".m.safetensors.ffffff-1-bbbb.tmp"  # a writer on another machine, recent
        ancient = tmp_path / ".m.safetensors.ffffff-2-cccc.tmp"  # untouched for two hours
        other = tmp_path / ".other.safetensors.ffffff-3-dddd.tmp"  # another target's
        for path in (live, remote, ancient, other):
            path.write_bytes(b"partial")
        two_hours_ago = time.time() - 7200
        os.utime(ancient, (two_hours_ago, two_hours_ago))
        os.utime(other, (two_hours_ago, two_hours_ago))
        fitted[0].save(tmp_path / "m.safetensors")
        assert _temporaries(tmp_path) == sorted([live.name, remote.name, other.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_current_file_without_its_checksum_is_refused(fitted, tmp_path):
    meta = padim_header(fitted[1].read_bytes())
    meta.pop("checksum")  # format version 2 requires it: deleting it is no way around the check
    bad = tmp_path / "nochecksum.safetensors"
    save_file(load_file(str(fitted[1])), str(bad), metadata={"padim": json.dumps(meta)})
    assert "checksum" in _one_line_refusal(bad)
