"""Recalibration after a change (issue 28): the good pictures' false-alarm rate before a change, after
it, and after ``PaDiM.recalibrate`` with k = 10, 20, 50 good pictures of the changed line; recall on
defects at each threshold; image AUROC after the change and after ``partial_fit`` (``padim update``)
with the same 50 pictures. Real pictures, simulated changes (those of benchmarks/drift.py).

    padim fit --data-root /work/shared/datasets --category elpv_mono --backbone efficientnet_lite0 \\
        --keep-statistics /tmp/elpv_mono.stats.safetensors --output /tmp/elpv_mono.safetensors
    PYTHONPATH=. python benchmarks/recalibration.py --model /tmp/elpv_mono.safetensors \\
        --statistics /tmp/elpv_mono.stats.safetensors --data-root /work/shared/datasets \\
        --json benchmarks/recalibration_elpv_mono.json

Pools: the category's test/good and test/defect pictures (never fitted on nor calibrated with), changed
(brightness +20 %, Gaussian blur of 2 px, rotation by 5 degrees), and another set-up: the other
category's good and defect pictures (200 of each, seeded). Each picture is scored once; a recalibration
with k pictures is the split-conformal threshold of k of the pool's good pictures drawn at random
(``Calibration.image_threshold``; one draw per change is checked equal to ``PaDiM.recalibrate`` on the
picture files), and its false-alarm rate is measured on the pool's other good pictures: the mean over
``--draws`` draws, which is what the guarantee bounds (on average over calibration sets), with the
sampling error of that mean and the 90th percentile of single draws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from sklearn.metrics import roc_auc_score

from padim import PaDiM
from padim.core.statistics import FitStatistics
from padim.settings import calibration as cal

CHANGES = {
    "none": lambda im: im,
    "brightness +20 %": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "blur 2 px": lambda im: im.filter(ImageFilter.GaussianBlur(2.0)),
    "rotation 5 degrees": lambda im: im.rotate(5, resample=Image.BILINEAR),
}


def pictures(folder: Path):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))


def write_pool(paths, change, folder: Path):
    """The pictures, changed, as PNG files in ``folder`` (what a line would write) -> their paths."""
    folder.mkdir(parents=True)
    out = []
    for i, path in enumerate(paths):
        target = folder / f"{i:04d}.png"
        change(Image.open(path).convert("RGB")).save(target)
        out.append(target)
    return out


def threshold(scores: np.ndarray, alpha: float) -> float:
    return cal.Calibration(np.sort(scores.astype(np.float64)), cal.PIXEL_LEVELS, np.zeros_like(cal.PIXEL_LEVELS)).image_threshold(alpha)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--statistics", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", default="elpv_mono")
    parser.add_argument("--other", default="elpv_poly")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--ks", default="10,20,50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    rng = np.random.default_rng(args.seed)
    model = PaDiM.load(args.model)
    alpha = model.target_fpr_
    t0 = model.image_threshold_
    root = Path(args.data_root)
    good, defect = pictures(root / args.category / "test" / "good"), pictures(root / args.category / "test" / "defect")
    other_good = pictures(root / args.other / "test" / "good") + pictures(root / args.other / "train" / "good")
    other_defect = pictures(root / args.other / "test" / "defect")
    pools = {name: (good, defect, change) for name, change in CHANGES.items()}
    pools[f"another set-up: {args.other}"] = ([other_good[i] for i in sorted(rng.choice(len(other_good), 200, replace=False))],
                                              [other_defect[i] for i in sorted(rng.choice(len(other_defect), 200, replace=False))],
                                              CHANGES["none"])
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, (good_paths, defect_paths, change)) in enumerate(pools.items()):
            g_paths = write_pool(good_paths, change, Path(scratch) / f"{index}" / "good")
            d_paths = write_pool(defect_paths, change, Path(scratch) / f"{index}" / "defect")
            g = np.asarray(model.predict(g_paths).scores, dtype=np.float64)
            d = np.asarray(model.predict(d_paths).scores, dtype=np.float64)
            row = {"good": len(g), "defect": len(d), "fpr_at_fit_threshold": float(np.mean(g >= t0)),
                   "recall_at_fit_threshold": float(np.mean(d >= t0)),
                   "auroc": float(roc_auc_score(np.r_[np.zeros(len(g)), np.ones(len(d))], np.r_[g, d])), "k": {}}
            for k in ks:
                fprs, recalls = [], []
                for draw in range(args.draws):
                    chosen = rng.choice(len(g), k, replace=False)
                    rest = np.setdiff1d(np.arange(len(g)), chosen)
                    cut = threshold(g[chosen], alpha)
                    if draw == 0:  # the shortcut is what PaDiM.recalibrate computes from the files
                        again = PaDiM.load(args.model).recalibrate([g_paths[i] for i in chosen])
                        assert again.image_threshold_ == cut, (again.image_threshold_, cut)
                    fprs.append(float(np.mean(g[rest] >= cut)))
                    recalls.append(float(np.mean(d >= cut)))
                fprs = np.asarray(fprs)
                calibration = cal.Calibration(np.zeros(k), cal.PIXEL_LEVELS, cal.PIXEL_LEVELS)
                row["k"][k] = {"fpr_mean": float(fprs.mean()), "fpr_sem": float(fprs.std(ddof=1) / math.sqrt(len(fprs))),
                               "fpr_p90": float(np.quantile(fprs, 0.9)), "recall_mean": float(np.mean(recalls)),
                               "guaranteed": calibration.guaranteed(alpha)}
            if name != "none":  # padim update with 50 of the changed good pictures, AUROC on the rest
                chosen = rng.choice(len(g), 50, replace=False)
                rest = np.setdiff1d(np.arange(len(g)), chosen)
                updated = PaDiM.load(args.model).attach_statistics(FitStatistics.load(args.statistics))
                updated.partial_fit([g_paths[i] for i in chosen])
                ug = np.asarray(updated.predict([g_paths[i] for i in rest]).scores, dtype=np.float64)
                ud = np.asarray(updated.predict(d_paths).scores, dtype=np.float64)
                before = roc_auc_score(np.r_[np.zeros(len(rest)), np.ones(len(d))], np.r_[g[rest], d])
                after = roc_auc_score(np.r_[np.zeros(len(rest)), np.ones(len(d))], np.r_[ug, ud])
                row["auroc_same_pictures_before_update"] = float(before)
                row["auroc_after_update_50"] = float(after)
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    out = {"model": os.path.basename(args.model), "target_fpr": alpha, "fit_threshold": t0,
           "n_calibration": model.calibration_.n, "draws": args.draws, "rows": rows}
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def table(out: dict) -> str:
    ks = list(next(iter(out["rows"].values()))["k"])
    head = ("| change | false alarms at the fit's threshold | " + " | ".join(f"after recalibrating, k = {k}" for k in ks)
            + " | recall: fit's / k = " + str(ks[-1]) + " | image AUROC | after update with 50 |")
    lines = [head, "|" + " --- |" * (5 + len(ks))]
    for name, row in out["rows"].items():
        cells = [f"{100 * row['fpr_at_fit_threshold']:.1f} %"]
        for k in ks:
            r = row["k"][k] if k in row["k"] else row["k"][str(k)]
            cells.append(f"{100 * r['fpr_mean']:.1f} % +- {100 * r['fpr_sem']:.1f} (p90 {100 * r['fpr_p90']:.0f} %; "
                         f"guaranteed {100 * r['guaranteed']:.1f} %)")
        last = row["k"][ks[-1]]
        cells.append(f"{row['recall_at_fit_threshold']:.3f} / {last['recall_mean']:.3f}")
        cells.append(f"{row['auroc']:.3f}")
        cells.append("" if "auroc_after_update_50" not in row else
                     f"{row['auroc_same_pictures_before_update']:.3f} -> {row['auroc_after_update_50']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
