"""Fuzz test of the model-file loader: 220 seeded cases of damaged or edited files.

Every case ends in a model or a one-line ``PadimError``: never another exception, a hang, or a
silently different model.

- 120 single-bit flips anywhere in the file and 30 truncations: always refused (the checksum);
- 20 header edits that leave the stored checksum stale: always refused;
- 50 header edits with the checksum recomputed (as a deliberate edit would): refused by the
  validation, or loaded; a loaded model must score the images exactly as the original did, unless the
  edit was a valid change of a field that only affects scoring (sigma, mean, std), and then its scores
  must still be finite.
"""

import random
import time

import numpy as np
import pytest

from conftest import FAST
from modelfile_helpers import rewrite
from padim.errors import PadimError
from padim.core.estimator import PaDiM

N_FLIPS, N_TRUNCATIONS, N_STALE_EDITS, N_EDITS = 120, 30, 20, 50
N_CASES = N_FLIPS + N_TRUNCATIONS + N_STALE_EDITS + N_EDITS  # 220
SCORING_FIELDS = {"sigma", "mean", "std"}
HOSTILE = [None, True, False, -1, 0, 1, 7, 2 ** 70, -(2 ** 70), 1e308, -1e-9, 0.5, float("nan"), float("inf"), "",
           "x", "resnet50", "layer4", [], {}, [1], [64, 64], [64, 64, 64], [-64, 64], [0.5, 0.5, 0.5],
           ["layer1"], ["blocks.1", "blocks.2"], {"a": 1}, "float16", "float64"]


@pytest.fixture(scope="module")
def original(synthetic_root, tmp_path_factory):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    images = sorted((synthetic_root / "fabric" / "test").rglob("*.png"))[:2]
    model = PaDiM(**FAST, n_features=8).fit(train)
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    model.save(path)
    return path.read_bytes(), images, model.predict(images).scores


def _edit(rng: random.Random):
    """One random header edit, and the config/top-level field it touched."""
    kind = rng.choice(["config_value", "config_delete", "config_extra", "top_value", "top_delete", "backbone", "d",
                       "size"])
    config_keys = ["backbone", "weights", "layers", "n_features", "image_size", "crop", "seed", "sigma", "epsilon",
                   "mean", "std", "factor_dtype"]
    top_keys = ["config", "feature_hw", "image_threshold", "pixel_threshold", "category", "n_train_images",
                "format", "format_version", "weights_source", "fit_seconds", "layout", "thresholds_note"]
    value = rng.choice(HOSTILE)
    if kind == "config_value":
        key = rng.choice(config_keys)
        return (lambda m: m["config"].__setitem__(key, value)), key
    if kind == "config_delete":
        key = rng.choice(config_keys)
        return (lambda m: m["config"].pop(key)), key
    if kind == "config_extra":
        return (lambda m: m["config"].__setitem__("extra", value)), "extra"
    if kind == "top_value":
        key = rng.choice(top_keys)
        return (lambda m: m.__setitem__(key, value)), key
    if kind == "top_delete":
        key = rng.choice(top_keys)
        return (lambda m: m.pop(key)), key
    if kind == "backbone":
        name = rng.choice(["resnet50", "wide_resnet50_2", "efficientnet_lite0"])
        return (lambda m: m["config"].__setitem__("backbone", name)), "backbone"
    if kind == "d":
        d = rng.choice([0, 7, 9, 100, 448, 449])
        return (lambda m: m["config"].__setitem__("n_features", d)), "n_features"
    size = [rng.choice([32, 63, 65, 128, 4096]), rng.choice([32, 63, 64, 65])]
    return (lambda m: m["config"].__setitem__("image_size", size)), "image_size"


def _outcome(path, images):
    """('refused', message) or ('loaded', scores); anything else propagates and fails the test."""
    started = time.perf_counter()
    try:
        model = PaDiM.load(path, device="cpu")
        result = ("loaded", model.predict(images).scores)
    except PadimError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        result = ("refused", message)
    assert time.perf_counter() - started < 20, "a case took too long"
    return result


def test_model_file_fuzz(original, tmp_path):
    data, images, scores = original
    rng = random.Random(20240610)
    path = tmp_path / "case.safetensors"
    counts = {"refused": 0, "loaded": 0}

    cases = []
    for _ in range(N_FLIPS):
        position, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        flipped = bytearray(data)
        flipped[position] ^= bit
        cases.append(("flip", bytes(flipped), f"bit {bit} at byte {position}", None))
    for _ in range(N_TRUNCATIONS):
        cut = rng.randrange(len(data))
        cases.append(("truncate", data[:cut], f"first {cut} bytes", None))
    for _ in range(N_STALE_EDITS):
        edit, key = _edit(rng)
        try:
            cases.append(("stale", rewrite(data, edit, checksum="keep"), f"stale edit of {key}", key))
        except KeyError:
            pass  # the edit deleted a key that an earlier step needs: nothing to test
    for _ in range(N_EDITS):
        edit, key = _edit(rng)
        cases.append(("edit", rewrite(data, edit, checksum=rng.choice(["recompute", "drop"])), f"edit of {key}", key))
    assert len(cases) >= N_CASES - N_STALE_EDITS

    for kind, content, what, key in cases:
        path.write_bytes(content)
        outcome, value = _outcome(path, images)
        counts[outcome] += 1
        if kind in ("flip", "truncate", "stale"):
            assert outcome == "refused", f"{kind} {what} was loaded"
        elif outcome == "loaded":
            assert np.isfinite(value).all() and value.shape == scores.shape, what
            if key not in SCORING_FIELDS:
                np.testing.assert_array_equal(value, scores, err_msg=f"{what} gave a different model")
    print(counts)
    assert counts["refused"] >= N_FLIPS + N_TRUNCATIONS
