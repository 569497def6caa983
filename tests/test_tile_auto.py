"""``--tile auto`` (issue 30): the written rule on known answers, and ``padim fit`` printing what it
chose, or warning about pictures much larger or longer than the model input."""

import numpy as np
import pytest
from PIL import Image

from padim import PaDiM
from padim.cli import main
from padim.settings.tile_geometry import auto_geometry

FAST_CLI = ["--backbone", "resnet18", "--weights", "random", "--batch-size", "8", "--device", "cpu",
            "--calibration-fraction", "0"]


@pytest.mark.parametrize("picture, expected", [
    ((1260, 500), ((1260, 500), 256)),  # KolektorSDD: long side 4.9x the input: native, tiles of 256
    ((3648, 5472), ((3648, 5472), 256)),  # 20 megapixels: native, 425 tiles
    ((250, 600), ((252, 600), 252)),  # long side 2.3x, short side under a tile: tiles of the short side
    ((250, 400), ((252, 400), None)),  # long (aspect 1.6) but small: the aspect kept, no tiles
    ((300, 300), None),  # within twice the input and square: as it is
    ((512, 400), None),  # exactly twice: as it is
])
def test_the_rule_on_known_answers(picture, expected):
    assert auto_geometry(picture, (256, 256)) == expected


def _category(root, size, n=6):
    folder = root / "long" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_fit_tile_auto_prints_and_fits_the_geometry_it_chose(tmp_path, capsys):
    root = _category(tmp_path / "data", (150, 400))
    out = tmp_path / "m.safetensors"
    assert main(["fit", "--data-root", str(root), "--category", "long", "--image-size", "64", "--tile", "auto",
                 "--output", str(out), *FAST_CLI]) == 0
    err = capsys.readouterr().err
    # by hand: long side 400 > 2 x 64: native 152 x 400 (multiples of 4), tiles of 64 overlapping by 8:
    # 3 down (0, 56, 88) and 7 across (0, 56, ..., 336)
    assert "--tile auto: the training pictures are 150x400 px (median of 6): --image-size 152x400 --tile 64 " \
           "--tile-statistics shared (21 tiles per picture)" in err
    config = PaDiM.load(out, device="cpu").config_
    assert (config.image_size, config.tile, config.tile_statistics) == ((152, 400), 64, "shared")


def test_fit_warns_about_large_pictures_and_says_what_auto_would_do(tmp_path, capsys):
    root = _category(tmp_path / "data", (150, 400))
    assert main(["fit", "--data-root", str(root), "--category", "long", "--image-size", "64",
                 "--output", str(tmp_path / "m.safetensors"), *FAST_CLI]) == 0
    err = capsys.readouterr().err
    assert "warning: the training pictures are 150x400 px (median of 6), much larger than the 64x64 model input" in err
    assert "--tile auto would use --image-size 152x400 --tile 64" in err
    assert PaDiM.load(tmp_path / "m.safetensors", device="cpu").config_.tile is None  # only a warning


def test_tile_auto_on_small_square_pictures_keeps_the_input(tmp_path, capsys):
    root = _category(tmp_path / "data", (90, 100))
    assert main(["fit", "--data-root", str(root), "--category", "long", "--image-size", "64", "--tile", "auto",
                 "--output", str(tmp_path / "m.safetensors"), *FAST_CLI]) == 0
    err = capsys.readouterr().err
    assert "no tiles, --image-size 64x64" in err and "warning" not in err
