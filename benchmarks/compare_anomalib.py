"""padim vs anomalib 2.7.0's PaDiM, side by side on one category folder (MVTec AD layout).

Same images, backbone, weights, image size, batch size, d, channel subset and thread count; each
fit and each test runs in its own process (peak resident memory is per process), padim first, then
anomalib, repeated --repeats times; medians are reported with the ratios ours / anomalib.

    pip install anomalib==2.7.0      # the benchmark's environment only; not a padim dependency
    python benchmarks/compare_anomalib.py --data-root ../shared/datasets --category magnetic_tile \\
        --backbone resnet18 --weights random --repeats 3

Figures: fit wall seconds; test ms per image (decoding included, metrics excluded); peak RSS of fit
and of test; model size on disk; image/pixel AUROC; the backbone-only forward time on the same test
batches (channels_last under inference_mode: the floor) and padim's test time over it, the two
alternated warm in one process (see ``phase_floor``); and the
equivalence check: both fitted on the same input tensors with the same channel subset, the maximum
relative difference between the two anomaly maps. The last line is a JSON summary.

anomalib's side is its own code: timm features_only backbone (for ResNets the `*.tv_in1k` weights,
i.e. torchvision's), its PadimModel (memory bank, torch.linalg.inv), torchvision Resize(antialias)
+ Normalize preprocessing, images decoded in the main thread as its DataLoader with num_workers=0.
Its model size is its state_dict saved with torch.save (what an anomalib checkpoint holds for PaDiM).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ANOMALIB_EPSILON = 0.01 + 1e-5  # anomalib's MultiVariateGaussian: cov + 0.01 I, then + 1e-5 I before inverting
TIMM_NAMES = {"resnet18": "resnet18.tv_in1k", "resnet50": "resnet50.tv_in1k", "wide_resnet50_2": "wide_resnet50_2.tv_in1k"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_category(args, need_test=True):
    from padim.data import find_category

    category = find_category(args.data_root, args.category, need_test=need_test)
    if args.max_train:
        category.train = category.train[: args.max_train]
    return category


# ------------------------------------------------------------------------------------------ anomalib
def anomalib_input(path, size):
    """anomalib 2.7.0's preprocessing: PIL RGB -> float [0, 1] -> Resize(antialias=True) -> Normalize."""
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as img:
        x = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
    x = TF.resize(x, [size, size], antialias=True)
    return TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def anomalib_mask(path, size):
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as img:
        mask = TF.to_image(img.convert("L"))
    return (TF.resize(mask, [size, size], interpolation=TF.InterpolationMode.NEAREST) > 127)[0]


def build_anomalib(args, channel_idx):
    """anomalib's PadimModel with padim's backbone weights and padim's channel subset."""
    from anomalib.models.image.padim.torch_model import PadimModel

    from padim.core.backbones import load_backbone
    from padim.settings.backbone_table import entry

    spec = entry(args.backbone)
    layers = args.layers.split(",") if args.layers else list(spec.default_layers)
    model = PadimModel(backbone=TIMM_NAMES.get(args.backbone, args.backbone), layers=layers, pre_trained=False,
                       n_features=len(channel_idx))
    # the very tensors padim's backbone starts from (random ones included, same seed); timm's ResNet
    # and EfficientNet use the same parameter names as the networks padim builds
    full, _, _ = load_backbone(args.backbone, args.weights, args.seed)
    state = full.state_dict()
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict({k: state[k] for k in extractor.state_dict()})
    model.idx = channel_idx.clone()
    return model


def phase_anomalib_fit(args):
    torch.set_num_threads(args.threads)
    category = load_category(args, need_test=False)
    channel_idx = torch.load(args.work / "channel_idx.pt")
    model = build_anomalib(args, channel_idx)
    started = time.perf_counter()
    model.train()
    model.feature_extractor.eval()
    for i in range(0, len(category.train), args.batch_size):
        model(torch.stack([anomalib_input(p, args.image_size) for p in category.train[i : i + args.batch_size]]))
    model.fit()
    wall = time.perf_counter() - started
    path = args.work / "anomalib_padim.pt"
    torch.save(model.state_dict(), path)
    return {"fit_s": wall, "fit_peak_mb": peak_rss_mb(), "model_mb": path.stat().st_size / 1e6}


def phase_anomalib_test(args):
    torch.set_num_threads(args.threads)
    category = load_category(args)
    channel_idx = torch.load(args.work / "channel_idx.pt")
    model = build_anomalib(args, channel_idx)
    model.load_state_dict(torch.load(args.work / "anomalib_padim.pt", weights_only=True))
    model.eval()
    scores, maps = [], []
    started = time.perf_counter()
    for i in range(0, len(category.test), args.batch_size):
        batch = torch.stack([anomalib_input(s.path, args.image_size) for s in category.test[i : i + args.batch_size]])
        with torch.no_grad():
            out = model(batch)
        scores.append(out.pred_score.flatten())
        maps.append(out.anomaly_map[:, 0])
    wall = time.perf_counter() - started
    masks = [anomalib_mask(s.mask, args.image_size) if s.mask else None for s in category.test]
    return {"test_ms_per_image": 1000 * wall / len(category.test), "test_peak_mb": peak_rss_mb(),
            **aurocs(category, torch.cat(scores).numpy(), torch.cat(maps).numpy(), masks)}


def aurocs(category, scores, maps, masks):
    from sklearn.metrics import roc_auc_score

    labels = np.array([s.is_anomalous for s in category.test])
    keep = [i for i, s in enumerate(category.test) if masks[i] is not None or not s.is_anomalous]
    truth = np.stack([masks[i].numpy() if masks[i] is not None else np.zeros(maps.shape[1:], bool) for i in keep])
    return {"image_AUROC": float(roc_auc_score(labels, scores)),
            "pixel_AUROC": float(roc_auc_score(truth.ravel(), maps[keep].ravel()))}


# ------------------------------------------------------------------------------------------ padim
def phase_ours_fit(args):
    torch.set_num_threads(args.threads)
    from padim import PaDiM

    category = load_category(args, need_test=False)
    model = PaDiM(backbone=args.backbone, weights=args.weights, n_features=args.n_features, image_size=args.image_size,
                  batch_size=args.batch_size, seed=args.seed, device="cpu",
                  layers=args.layers.split(",") if args.layers else None)
    started = time.perf_counter()
    model.fit(category.train)
    wall = time.perf_counter() - started
    path = args.work / "padim.safetensors"
    model.save(path)
    torch.save(model.channel_idx_.cpu(), args.work / "channel_idx.pt")
    return {"fit_s": wall, "fit_peak_mb": peak_rss_mb(), "model_mb": path.stat().st_size / 1e6}


def phase_ours_test(args):
    torch.set_num_threads(args.threads)
    from padim import PaDiM
    from padim.files.images import load_mask

    from padim.files.memory import tune_malloc_for_scoring

    tune_malloc_for_scoring()  # as the padim command does before it scores
    category = load_category(args)
    model = PaDiM.load(args.work / "padim.safetensors", device="cpu", batch_size=args.batch_size)
    scores, maps, sizes = [], [], []
    started = time.perf_counter()
    for batch_scores, batch_maps, batch_sizes in model.iter_predict([s.path for s in category.test]):
        scores.append(batch_scores)
        maps.append(batch_maps)
        sizes += batch_sizes
    wall = time.perf_counter() - started
    masks = [load_mask(s.mask, model.config_, hw) if s.mask else None for s, hw in zip(category.test, sizes)]
    return {"test_ms_per_image": 1000 * wall / len(category.test), "test_peak_mb": peak_rss_mb(),
            **aurocs(category, torch.cat(scores).numpy(), torch.cat(maps).numpy(), masks)}


def phase_floor(args):
    """padim's test time against the backbone-only forward time, side by side in one process.

    The floor: the same test batches, already decoded and normalised, through the same truncated
    backbone (BatchNorm folded where padim folds it), channels_last under inference_mode, in the
    chunks padim runs. Alternated with full padim test passes (decoding included), each warm,
    ``--floor-pairs`` times; medians of each. Measured in one process and interleaved because this
    machine's speed drifts by 20% from minute to minute: a ratio of passes minutes apart is noise.
    """
    torch.set_num_threads(args.threads)
    from padim import PaDiM
    from padim.files.images import load_pixels

    def load_image(item, config):  # an independent normalisation: torchvision's, on padim's decoded pixels
        from torchvision.transforms.v2 import functional as TF

        pixels = torch.from_numpy(load_pixels(item, config)[0]).permute(2, 0, 1)
        return TF.normalize(pixels.float() / 255.0, list(config.mean), list(config.std)), None
    from padim.core.features import CPU_FORWARD_CHUNK
    from padim.files.memory import tune_malloc_for_scoring

    tune_malloc_for_scoring()  # as the padim command does before it scores

    category = load_category(args)
    paths = [s.path for s in category.test]
    model = PaDiM.load(args.work / "padim.safetensors", device="cpu", batch_size=args.batch_size)
    batches = [torch.stack([load_image(p, model.config_)[0] for p in paths[i : i + args.batch_size]])
               .contiguous(memory_format=torch.channels_last) for i in range(0, len(paths), args.batch_size)]

    def floor_pass():
        with torch.inference_mode():
            started = time.perf_counter()
            for batch in batches:
                for part in batch.split(CPU_FORWARD_CHUNK):
                    model.extractor_(part)
            return 1000 * (time.perf_counter() - started) / len(paths)

    def test_pass():
        started = time.perf_counter()
        for _ in model.iter_predict(paths):
            pass
        return 1000 * (time.perf_counter() - started) / len(paths)

    floor_pass(), test_pass()  # warm-up of both
    floors, tests = [], []
    for _ in range(args.floor_pairs):
        floors.append(floor_pass())
        tests.append(test_pass())
    floor, test = statistics.median(floors), statistics.median(tests)
    return {"floor_ms_per_image": floor, "warm_test_ms_per_image": test, "test_over_floor": test / floor}


def phase_equivalence(args):
    """Both implementations on the same input tensors (padim's preprocessing), the same channel subset
    and the same backbone weights: fit on the first training images, compare the anomaly maps.

    anomalib 2.7.0 adds 1e-5 * I to the paper's covariance + 0.01 * I before inverting; padim is
    given the same total regularisation here, so that only the two implementations differ."""
    torch.set_num_threads(args.threads)
    from padim import PaDiM
    from padim.files.images import load_pixels

    def load_image(item, config):  # an independent normalisation: torchvision's, on padim's decoded pixels
        from torchvision.transforms.v2 import functional as TF

        pixels = torch.from_numpy(load_pixels(item, config)[0]).permute(2, 0, 1)
        return TF.normalize(pixels.float() / 255.0, list(config.mean), list(config.std)), None

    category = load_category(args)
    train = category.train[: args.equivalence_images]
    test = [s.path for s in category.test[:: max(1, len(category.test) // 32)]][:32]
    ours = PaDiM(backbone=args.backbone, weights=args.weights, n_features=args.n_features, image_size=args.image_size,
                 batch_size=args.batch_size, seed=args.seed, device="cpu", epsilon=ANOMALIB_EPSILON,
                 layers=args.layers.split(",") if args.layers else None).fit(train)
    theirs = build_anomalib(args, ours.channel_idx_.cpu())
    theirs.train()
    theirs.feature_extractor.eval()
    for i in range(0, len(train), args.batch_size):
        theirs(torch.stack([load_image(p, ours.config_)[0] for p in train[i : i + args.batch_size]]))
    theirs.fit()
    theirs.eval()
    with torch.no_grad():
        their_maps = theirs(torch.stack([load_image(p, ours.config_)[0] for p in test])).anomaly_map[:, 0]
    our_maps = torch.from_numpy(ours.predict(test).maps)
    relative = ((our_maps - their_maps).abs() / their_maps.abs().clamp_min(1e-12)).max().item()
    return {"equivalence_max_rel_diff": relative, "equivalence_train_images": len(train),
            "equivalence_test_images": len(test)}


PHASES = {"ours-fit": phase_ours_fit, "ours-test": phase_ours_test, "anomalib-fit": phase_anomalib_fit,
          "anomalib-test": phase_anomalib_test, "floor": phase_floor, "equivalence": phase_equivalence}


# ------------------------------------------------------------------------------------------ driver
def run_phase(args, phase):
    command = [sys.executable, __file__, "--phase", phase, "--work", str(args.work)] + args.passthrough
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="imagenet", help="imagenet, random (timing only) or a state_dict file")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--n-features", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--equivalence-images", type=int, default=256,
                        help="training images of the equivalence fit (fewer than d + 1 leaves the covariances "
                             "singular but for the 0.01 ridge, and anomalib's float32 inverse then dominates)")
    parser.add_argument("--floor-pairs", type=int, default=2, help="floor / padim test passes alternated per run")
    parser.add_argument("--skip-anomalib", action="store_true", help="padim's figures only")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    args.passthrough = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="padim-bench-") as work:
        args.work = Path(work)
        runs = {"padim": [], "anomalib": []}
        for repeat in range(args.repeats):
            ours = {**run_phase(args, "ours-fit"), **run_phase(args, "ours-test"), **run_phase(args, "floor")}
            runs["padim"].append(ours)
            print(f"run {repeat + 1}: padim    {json.dumps({k: round(v, 4) for k, v in ours.items()})}", flush=True)
            if not args.skip_anomalib:
                theirs = {**run_phase(args, "anomalib-fit"), **run_phase(args, "anomalib-test")}
                runs["anomalib"].append(theirs)
                print(f"run {repeat + 1}: anomalib {json.dumps({k: round(v, 4) for k, v in theirs.items()})}", flush=True)
        equivalence = {} if args.skip_anomalib else run_phase(args, "equivalence")

    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items() if rs}
    ours = median["padim"]
    print(f"\n{args.category}, {args.backbone} ({args.weights} weights), {args.image_size}px, batch {args.batch_size}, "
          f"{args.threads} threads, medians of {args.repeats}")
    figures = ["fit_s", "test_ms_per_image", "fit_peak_mb", "test_peak_mb", "model_mb", "image_AUROC", "pixel_AUROC"]
    ratios = {}
    print(f"{'figure':<20}{'padim':>12}{'anomalib':>12}{'ratio':>10}")
    for key in figures:
        theirs = median.get("anomalib", {}).get(key)
        ratio = ours[key] / theirs if theirs else None
        if key.endswith("AUROC"):
            ratio = ours[key] - theirs if theirs is not None else None  # a difference, not a ratio
        ratios[key] = ratio
        shown = "" if ratio is None else (f"{ratio:+.4f}" if key.endswith("AUROC") else f"{ratio:.3f}")
        print(f"{key:<20}{ours[key]:>12.4f}{(theirs if theirs is not None else float('nan')):>12.4f}{shown:>10}")
    over_floor = ours["test_over_floor"]
    print(f"backbone-only floor {ours['floor_ms_per_image']:.2f} ms/image (channels_last, inference_mode, same "
          f"truncated backbone); padim test, warm, alternated with it: {ours['warm_test_ms_per_image']:.2f} ms/image; "
          f"padim test / floor = {over_floor:.3f}")
    if equivalence:
        print(f"equivalence: max relative difference of anomaly maps {equivalence['equivalence_max_rel_diff']:.2e} "
              f"({equivalence['equivalence_train_images']} training, {equivalence['equivalence_test_images']} test images)")
    print(json.dumps({"category": args.category, "backbone": args.backbone, "weights": args.weights,
                      "image_size": args.image_size, "batch_size": args.batch_size, "threads": args.threads,
                      "repeats": args.repeats, "median": median, "ratios": ratios, "test_over_floor": over_floor,
                      **equivalence}))


if __name__ == "__main__":
    main()
