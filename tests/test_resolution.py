"""Maps and masks at a picture's own resolution (``padim.pipeline.resolution``): PyTorch's bilinear
resize is the reference, and an ignore region stays out of every full-size map and mask (before,
the bilinear resize carried the scores at the region's edge a row or two into it)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FAST
from padim import PaDiM
from padim.pipeline.resolution import ignore_at, map_at, mask_at


def _torch_resize(anomaly_map: np.ndarray, size) -> np.ndarray:
    return F.interpolate(torch.from_numpy(anomaly_map)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("shape,size", [((64, 64), (48, 96)), ((64, 48), (333, 17)), ((32, 32), (32, 32)),
                                        ((20, 30), (7, 200)), ((64, 64), (1000, 700))])
def test_map_at_equals_pytorchs_bilinear_resize(shape, size):
    anomaly_map = np.random.default_rng(0).random(shape, dtype=np.float32) * 50
    np.testing.assert_allclose(map_at(anomaly_map, size), _torch_resize(anomaly_map, size), rtol=1e-5, atol=1e-4)


def test_mask_at_is_the_resized_map_at_or_above_the_threshold_strip_by_strip(monkeypatch):
    import padim.pipeline.resolution as resolution

    monkeypatch.setattr(resolution, "_STRIP_PIXELS", 1000)  # many strips
    anomaly_map = np.random.default_rng(1).random((40, 30), dtype=np.float32)
    reference = _torch_resize(anomaly_map, (301, 203))
    threshold = float(np.quantile(reference, 0.9))
    got = mask_at(anomaly_map, (301, 203), threshold)
    differ = got != (reference >= threshold)
    assert differ.mean() < 1e-3 and np.abs(reference[differ] - threshold).max(initial=0) < 1e-5  # rounding only


def test_the_ignore_region_is_zero_and_never_masked_at_full_size():
    ignore = np.zeros((64, 64), dtype=bool)
    ignore[:, 40:] = True
    anomaly_map = np.full((64, 64), 5.0, dtype=np.float32)
    anomaly_map[ignore] = 0.0  # as the scorer gives it
    size = (300, 450)
    full_ignore = ignore_at(ignore, size)
    plain = map_at(anomaly_map, size)
    assert (plain[full_ignore] > 0.5).any()  # the leak the bilinear resize makes on its own
    assert not map_at(anomaly_map, size, ignore)[full_ignore].any()
    mask = mask_at(anomaly_map, size, 0.5, ignore)
    assert not mask[full_ignore].any() and mask[~full_ignore].all()
    nearest = np.asarray(Image.fromarray(ignore.astype(np.uint8) * 255).resize((450, 300), Image.NEAREST)) > 0
    np.testing.assert_array_equal(full_ignore, nearest)


def test_predict_at_original_resolution_keeps_the_ignore_region_out(synthetic_root, tmp_path):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    roi = np.zeros((64, 64), dtype=bool)
    roi[20:44, 30:] = True
    model = PaDiM(**FAST, ignore_mask=roi, calibration_fraction=0).fit(train)
    picture = np.asarray(Image.open(train[0]).convert("RGB").resize((150, 110)))
    result = model.predict([picture], original_resolution=True, pixel_threshold=1e-6)
    full_ignore = ignore_at(roi, (110, 150))
    assert result.maps[0].shape == (110, 150)
    assert not result.maps[0][full_ignore].any() and result.maps[0][~full_ignore].min() > 0
    assert not result.masks[0][full_ignore].any() and result.masks[0][~full_ignore].all()


def test_an_export_carries_the_ignore_mask_and_keeps_it_out_at_full_size(synthetic_root, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install '.[export]')")
    pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install '.[export]')")
    from padim.deploy.cache import export_file
    from padim.runtime import ExportedModel

    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    roi = np.zeros((64, 64), dtype=bool)
    roi[:, 44:] = True
    model = PaDiM(**FAST, ignore_mask=roi, calibration_fraction=0).fit(train)
    model.save(tmp_path / "m.safetensors")
    exported = ExportedModel(export_file(tmp_path / "m.safetensors", "onnx", tmp_path / "export", model=model))
    np.testing.assert_array_equal(exported.ignore_mask_, roi)
    picture = np.asarray(Image.open(train[1]).convert("RGB").resize((90, 70)))
    result = exported.predict([picture], original_resolution=True, pixel_threshold=1e-6)
    full_ignore = ignore_at(roi, (70, 90))
    assert not result.masks[0][full_ignore].any() and result.masks[0][~full_ignore].all()
