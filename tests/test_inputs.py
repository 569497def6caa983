"""Inputs as real users have them (issue 10): bit depths, EXIF orientation, hand-made masks, folders
with odd entries, missing ground truth, huge pictures, same-named inputs.

Every reference is computed here with NumPy from what the test wrote (or read from a known answer),
never from padim's own reader.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim.settings.config import PadimConfig
from padim.data.mvtec import find_category, list_images
from padim.files.decode import read_image, read_mask
from padim.errors import DataError
from padim.files.decode import read_image
from padim.files.images import load_mask, load_pixels

from conftest import FAST
from imagefiles import png16_rgb, save, to8, upright

RNG = np.random.default_rng(10)


def open_image(item):
    """The decoded, upright 8-bit picture (``read_image`` at the picture's own size)."""
    return read_image(item)[0]


# ------------------------------------------------------------------------------------ bit depths
@pytest.mark.parametrize("name, kwargs", [("g16.png", {}), ("g16.tif", {}), ("g16.TIFF", {"compression": "tiff_lzw"})])
def test_16bit_greyscale_keeps_its_dynamic_range(tmp_path, name, kwargs):
    """Old code: convert("RGB") clipped every value above 255 to white (a 16-bit picture -> all white)."""
    values = RNG.integers(0, 65536, (9, 13)).astype(np.uint16)
    values[0, :3] = (0, 65535, 32896)  # black, white, mid grey (32896 / 257 = 128)
    save(Image.fromarray(values), tmp_path / name, **kwargs)
    got = np.asarray(open_image(tmp_path / name))
    assert got.shape == (9, 13)
    np.testing.assert_array_equal(got, to8(values, 65535))
    assert tuple(got[0, :3]) == (0, 255, 128)


def test_16bit_big_endian_and_32bit_integer_tiff(tmp_path):
    values = RNG.integers(0, 65536, (5, 6)).astype(np.uint16)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "be.tif")  # mode I;16B
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "be.tif")), to8(values, 65535))
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I holding 16-bit data
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "i32.tif")), to8(values, 65535))
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match="0..65535"):
        open_image(tmp_path / "wide.tif")


def test_16bit_rgb_png_is_read_by_its_high_byte(tmp_path):
    values = RNG.integers(0, 65536, (4, 7, 3)).astype(np.uint16)
    png16_rgb(values, tmp_path / "rgb16.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "rgb16.png")), (values >> 8).astype(np.uint8))


def test_float_tiff_in_unit_range_is_scaled_by_255_and_other_ranges_refused(tmp_path):
    """Old code: convert("RGB") of [0, 1] floats gave a black picture (values 0 and 1)."""
    values = RNG.random((6, 5)).astype(np.float32)
    values[0, 0], values[0, 1] = 0.0, 1.0
    Image.fromarray(values).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "f.tif")), to8(values, 1.0))
    for bad, match in ((values * 300, "values from 0 to 300"), (np.where(values > 0.5, np.nan, values), "NaN")):
        Image.fromarray(bad.astype(np.float32)).save(tmp_path / "bad.tif")
        with pytest.raises(DataError, match=match) as caught:
            open_image(tmp_path / "bad.tif")
        assert "\n" not in str(caught.value)


def test_other_modes_keep_working(tmp_path):
    rgb = RNG.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((5, 4), 7, np.uint8)])).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "rgba.png")), rgb)  # alpha dropped
    bits = RNG.random((5, 9)) > 0.5
    Image.fromarray(bits).save(tmp_path / "one.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "one.png")), np.where(bits, 255, 0))
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (6, 3)).astype(np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.ravel().tolist())
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "p.png")), palette[index])
    cmyk = RNG.integers(0, 128, (3, 4, 4)).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    ink = cmyk.astype(float)
    expected = np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255)  # Pillow 13's CMYK -> RGB
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "c.tif")), expected)


def test_arrays_of_other_depths(tmp_path):
    values = RNG.integers(0, 65536, (3, 4)).astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(open_image(values)), to8(values, 65535))
    with pytest.raises(DataError, match="int64"):
        open_image(values.astype(np.int64))


# ------------------------------------------------------------------------------------------ EXIF
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_images_and_masks_upright(tmp_path, orientation):
    """Old code ignored the tag: the picture was scored sideways, its size reported as stored, and a
    mask drawn on the upright picture did not fit."""
    stored = np.zeros((40, 64), np.uint8)
    stored[:10, :16] = 255  # a bright corner: top-left as stored
    save(Image.fromarray(stored), tmp_path / "img.jpg", orientation, quality=95)
    save(Image.fromarray(stored), tmp_path / "img.png", orientation)
    save(Image.fromarray((stored > 0).astype(np.uint8)), tmp_path / "mask.png", orientation)
    expected = upright(stored, orientation)
    config = PadimConfig(image_size=(expected.shape[0], expected.shape[1]))
    for name in ("img.png", "img.jpg"):
        pixels, original = load_pixels(tmp_path / name, config)
        assert original == expected.shape
        tolerance = 0 if name.endswith("png") else 40
        assert np.abs(pixels[..., 0].astype(int) - expected).max() <= tolerance
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.png", config, expected.shape).numpy(), expected > 0)


# ----------------------------------------------------------------------------------------- masks
def _mask_cases():
    defect = np.zeros((6, 8), bool)
    defect[1:3, 2:6] = True
    defect[5, 7] = True
    red = np.zeros((6, 8, 3), np.uint8)
    red[defect] = (200, 0, 0)
    dark = np.zeros((6, 8, 3), np.uint8)
    dark[defect] = (0, 0, 40)
    return defect, {
        "zero_one.png": Image.fromarray(defect.astype(np.uint8)),  # 0/1: black to the eye
        "zero_255.png": Image.fromarray(defect.astype(np.uint8) * 255),
        "red_drawing.png": Image.fromarray(red),
        "dark_blue.png": Image.fromarray(dark),
        "sixteen.png": Image.fromarray(defect.astype(np.uint16) * 1000),
        "bits.png": Image.fromarray(defect),
    }


def test_any_non_black_mask_pixel_is_defect(tmp_path):
    """Old code: convert("L") > 127 missed 0/1 masks, dark colours and 16-bit masks with small values."""
    defect, cases = _mask_cases()
    for name, img in cases.items():
        img.save(tmp_path / name)
        np.testing.assert_array_equal(read_mask(tmp_path / name), defect, err_msg=name)
    palette = Image.fromarray(defect.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 90, 0] + [0] * 762)  # index 1 = dark green
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), defect)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but transparent except the drawing
    rgba[defect, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png"), defect)


def test_mask_extension_case_is_ignored(writable_root):
    """Old code looked for exactly ``000_mask.png``: ``000_mask.PNG`` beside ``000.JPG`` was missed."""
    category = writable_root / "fabric"
    image = category / "test" / "spot" / "000.png"
    Image.open(image).convert("RGB").save(image.with_name("000.JPG"), quality=95)
    image.unlink()
    mask = category / "ground_truth" / "spot" / "000_mask.png"
    mask.rename(mask.with_name("000_mask.PNG"))
    found = find_category(writable_root, "fabric", need_test=True)
    sample = next(s for s in found.test if s.path.name == "000.JPG")
    assert sample.mask is not None and sample.mask.name == "000_mask.PNG"


# ---------------------------------------------------------------------------------------- folders
def test_folder_listing_reports_what_it_skips(tmp_path):
    """Old code dropped these without a word."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (4, 4)).save(folder / "a.png")
    Image.new("L", (4, 4)).save(folder / "b.TIF")
    (folder / "c.heic").write_bytes(b"not read")
    (folder / "d.png").symlink_to(tmp_path / "missing.png")
    (folder / "e.jpg").mkdir()
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"ignored")
    notes = []
    assert [p.name for p in list_images(folder, note=notes.append)] == ["a.png", "b.TIF"]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "skipped 3 entries" in notes[0]
    for text in ("c.heic (format not read by padim)", "d.png (broken link)", "e.jpg (a folder)"):
        assert text in notes[0]
    assert "notes.txt" not in notes[0] and "hidden" not in notes[0]
    with pytest.warns(UserWarning, match="skipped 3"):
        list_images(folder)


# ------------------------------------------------------------------------------ size limits
def test_decompression_bomb_limit_is_padims_one_line_error(tmp_path, monkeypatch):
    """Old code: Pillow's DecompressionBombWarning leaked between its two limits."""
    Image.new("L", (40, 40)).save(tmp_path / "mid.png")  # 1600 pixels: between 1000 and 2000
    Image.new("L", (50, 50)).save(tmp_path / "big.png")  # 2500 pixels: over the 2 x 1000 limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(tmp_path / "mid.png").size == (40, 40)
    with pytest.raises(DataError, match="decompression-bomb limit") as caught:
        open_image(tmp_path / "big.png")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_early_reduction_stays_close_to_a_direct_resize(tmp_path, suffix):
    """A picture 25 x the input size is decoded reduced (JPEG draft) or box-reduced first; the result
    stays within 3 grey levels of Pillow's direct antialiased resize of the full picture."""
    y, x = np.mgrid[0:1600, 0:1600] / 1600.0
    base = 128 + 60 * np.sin(12 * x + 3 * np.sin(5 * y)) + 30 * np.cos(40 * y * x)
    arr = np.clip(np.stack([base, 0.8 * base, 255 - base], -1) + RNG.normal(0, 8, (1600, 1600, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(tmp_path / f"big.{suffix}", quality=95)
    config = PadimConfig(image_size=(64, 64))
    resized, original = read_image(tmp_path / f"big.{suffix}", config.image_size)
    assert original == (1600, 1600) and resized.size == (64, 64)
    direct = Image.open(tmp_path / f"big.{suffix}").convert("RGB").resize((64, 64), Image.BILINEAR)
    pixels, _ = load_pixels(tmp_path / f"big.{suffix}", config)
    assert np.abs(pixels.astype(int) - np.asarray(direct).astype(int)).max() <= 3


# ------------------------------------------------------------------------- a fitted tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, synthetic_root):
    from padim.core.estimator import PaDiM

    model = PaDiM(**FAST).fit(find_category(synthetic_root, "fabric").train[:4])
    model.image_threshold_ = model.pixel_threshold_ = 1.0  # masks are written too
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    model.save(path)
    return path


def test_predict_outputs_of_same_stem_inputs_do_not_collide(tiny_model, tmp_path, capsys):
    """Old code named outputs by stem: 000.tif's heatmap overwrote 000.png's."""
    from padim.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(folder / "000.png")
    Image.new("RGB", (16, 48), (200, 20, 30)).save(folder / "000.tif")
    (folder / "000.webm").write_bytes(b"")  # not named like an image: ignored silently
    (folder / "001.avif").write_bytes(b"")
    assert main(["predict", "--model", str(tiny_model), str(folder), "--device", "cpu", "--output",
                 str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000.png_heatmap.png", "000.png_mask.png", "000.tif_heatmap.png", "000.tif_mask.png"]
    assert Image.open(tmp_path / "out" / "000.tif_heatmap.png").size == (16, 48)
    assert Image.open(tmp_path / "out" / "000.png_mask.png").size == (32, 24)
    assert "skipped 1 entry" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test writing its pictures
# SLOW: about 20-30 s on 2 shared cores (two 12000 x 12000 pictures written, then scored in a subprocess)
def test_a_12000_pixel_picture_is_scored_in_under_2_gb(tiny_model, tmp_path):
    """Old code: 11.6 GB peak (full-size float maps, a float64 RGBA colour map, full decodes)."""
    n = 12000
    ramp = (np.arange(n, dtype=np.uint32) * 255 // n).astype(np.uint8)
    picture = np.empty((n, n, 3), np.uint8)
    picture[..., 0], picture[..., 1], picture[..., 2] = ramp[None, :], ramp[:, None], 128
    Image.fromarray(picture).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(picture).save(tmp_path / "big.png", compress_level=1)
    del picture
    script = (
        "import sys\n"
        "from padim.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        # VmHWM, the peak of this process's own memory: ru_maxrss would also count the parent's
        # (pytest's) memory, which the child shares between vfork and exec
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]\n"
        "print('PEAK_MB', int(hwm) / 1024, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, "predict", "--model", str(tiny_model), str(tmp_path / "big.jpg"),
                           str(tmp_path / "big.png"), "--device", "cpu", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stderr.split("PEAK_MB")[1].split()[0])
    assert peak_mb < 2048, peak_mb
    for name in ("big.jpg", "big.png"):
        assert Image.open(tmp_path / "out" / f"{name}_heatmap.png").size == (4096, 4096)
        assert Image.open(tmp_path / "out" / f"{name}_mask.png").size == (n, n)


# --------------------------------------------------------------------- no usable ground truth
def test_no_usable_mask_gives_image_metrics_and_pixel_metrics_na(writable_root, tmp_path, monkeypatch, capsys):
    """Old code: pixel_metrics raised ValueError (a traceback) and padim benchmark stopped there."""
    import padim.jobs.benchmark as benchmark
    from padim.cli import main

    shutil.rmtree(writable_root / "fabric" / "ground_truth")  # image-level labels only
    shutil.copytree(writable_root / "fabric", writable_root / "broken")
    real_fit = benchmark.fit_category

    def fit(data_root, category, *args, **kwargs):
        if category == "broken":
            raise ValueError("something padim did not expect")
        return real_fit(data_root, category, *args, **kwargs)

    monkeypatch.setattr(benchmark, "fit_category", fit)
    out = tmp_path / "bench"
    bench = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--device", "cpu",
             "--batch-size", "8", "--max-images", "1"]
    assert main(["benchmark", "--data-root", str(writable_root), "--categories", "broken,fabric", "--output",
                 str(out), *bench]) == 1  # the broken category fails the command; fabric still runs
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith("padim benchmark: error: category 'broken' failed: unexpected ValueError")
    assert "pixel metrics not available" in err
    assert "unexpected ValueError: something padim did not expect" in err and "Traceback" in err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["category"] == "broken" and "ValueError" in rows[0]["error"]
    fabric = rows[1]
    assert 0.0 <= fabric["image_AUROC"] <= 1.0
    assert fabric["pixel_AUROC"] is None and fabric["pixel_F1Score"] is None and fabric["pixel_AUPRO"] is None
    metrics = json.loads((out / "fabric" / "metrics.json").read_text())
    assert metrics["pixel_AUROC"] is None and metrics["oracle_pixel_threshold"] is None
    table = (out / "results.md").read_text().splitlines()
    assert table[3].split("|")[4].strip() == "n/a" and table[4].split("|")[4].strip() == "n/a"  # pixel_AUROC
    assert "n/a" in (out / "results.csv").read_text().splitlines()[2]
    assert "<td>n/a</td>" in (out / "report.html").read_text()
    assert (out / "fabric" / "roc.png").is_file()

    # all-black masks are no ground truth either: padim test reports image metrics and n/a
    black = writable_root / "fabric" / "ground_truth" / "spot"
    black.mkdir(parents=True)
    for image in (writable_root / "fabric" / "test" / "spot").iterdir():
        Image.new("L", Image.open(image).size).save(black / f"{image.stem}_mask.png")
    assert main(["test", "--model", str(out / "fabric" / "model.safetensors"), "--data-root", str(writable_root),
                 "--category", "fabric", "--device", "cpu", "--output", str(tmp_path / "test")]) == 0
    captured = capsys.readouterr()
    assert "all-black mask" in captured.err and "| n/a |" in captured.out
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["pixel_AUPRO"] is None


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A folder where predict's heatmap file should go: one line, exit 1, no traceback."""
    from padim import PaDiM
    from padim.cli import main

    rng = np.random.default_rng(0)
    model = PaDiM(backbone="resnet18", weights="random", image_size=64, batch_size=4, device="cpu").fit(
        [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)])
    model.save(tmp_path / "m.safetensors")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "out" / "a.png_heatmap.png").mkdir(parents=True)
    assert main(["predict", "--model", str(tmp_path / "m.safetensors"), str(tmp_path / "a.png"), "--device", "cpu",
                 "--output", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("padim")]
    assert len(err) == 1 and "cannot write" in err[0]
