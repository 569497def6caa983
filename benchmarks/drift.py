"""Drift alarms (issue 23): (a) how often exchangeable streams ever alarm, by simulation, for both
streams; (b) images until alarm for real changes on real pictures, and false alarms on real good
pictures in random order.

    padim fit --data-root /work/shared/datasets --category elpv_mono --backbone efficientnet_lite0 \\
        --output /tmp/elpv_mono.safetensors
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/drift.py --model /tmp/elpv_mono.safetensors \\
        --data-root /work/shared/datasets --json benchmarks/drift_elpv_mono_cal47.json

(a) needs NumPy only (``--simulate-only``). (b) scores each picture once (cached in ``--scores``) and
draws streams from the pools at random with replacement (i.i.d. from each pool; repeats tie exactly,
and the online p-value breaks ties at random). Pools: the category's test/good pictures (never fitted
or calibrated on) unchanged, brighter, blurred or rotated; the other category's good pictures; the
test/defect pictures for defect rates. "No change" with no repeats: test/good in random order.
Caveat: draws from a pool of 118 pictures are exchangeable with each other but not exactly with the
calibration images (the pool is one sample), so "while calm" alarm fractions of the long streams are
not a test of the guarantee; the permuted row and (a) are. After a calm part, the changed pictures
are the calm part's 118, changed: on a line they would be new ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np

from padim.monitor.drift import STREAMS, ConformalMartingale, OnlinePValues, stream_inputs


def alarms(reference, streams: np.ndarray, delta: float, seed: int) -> dict:
    """The code the service runs (``DriftMonitor`` is this loop for one copy), for R streams at once:
    reference (n,) or (R, n) scores, streams (R, L) -> {stream kind: (R,) index of the image at which
    its martingale first reached 1 / delta, -1 if never}."""
    rng = np.random.default_rng(seed)
    copies, length = streams.shape
    online = OnlinePValues(reference, copies, rng=rng)
    martingales = {name: ConformalMartingale(copies) for name in STREAMS}
    first = {name: np.full(copies, -1) for name in STREAMS}
    limit = math.log(1 / delta)
    for t in range(length):
        for name, (q, active) in stream_inputs(online.step(streams[:, t]), 0.05).items():
            martingales[name].step(q, active)
            first[name] = np.where((first[name] < 0) & (martingales[name].log_value >= limit), t, first[name])
    return first


def simulate(streams: int, steps: int, delta: float, n_calibration: int, seed: int, ties: bool = False,
             fixed: bool = False, chunk: int = 250) -> dict:
    """Fraction of ``streams`` exchangeable streams (calibration and stream i.i.d. from one
    distribution, a new calibration draw per stream) whose martingale ever reaches 1 / delta within
    ``steps``, per stream kind. ties: integer scores (heavy ties); fixed: bet instead on p-values
    against the fixed calibration draw (padim's, smoothed so that each is exactly uniform): the
    construction the online p-values replace."""
    rng = np.random.default_rng(seed)
    draw = (lambda *shape: rng.poisson(20.0, shape).astype(float)) if ties else \
        (lambda *shape: rng.lognormal(3.0, 0.2, shape))
    hits = {name: 0 for name in STREAMS}
    for start in range(0, streams, chunk):
        c = min(chunk, streams - start)
        calibration, stream = draw(c, n_calibration), draw(c, steps)
        if fixed:
            above = (calibration[:, None, :] > stream[:, :, None]).sum(2)
            ties_ = (calibration[:, None, :] == stream[:, :, None]).sum(2)
            p = (above + rng.random((c, steps)) * (ties_ + 1)) / (n_calibration + 1.0)
            first = _alarms_on_p(p, delta)
        else:
            first = alarms(calibration, stream, delta, seed + start)
        for name in STREAMS:
            hits[name] += int((first[name] >= 0).sum())
    return {name: hits[name] / streams for name in STREAMS}


def _alarms_on_p(p: np.ndarray, delta: float) -> dict:
    """As ``alarms``, betting on given p-values (R, L)."""
    martingales = {name: ConformalMartingale(len(p)) for name in STREAMS}
    first = {name: np.full(len(p), -1) for name in STREAMS}
    for t in range(p.shape[1]):
        for name, (q, active) in stream_inputs(p[:, t], 0.05).items():
            martingales[name].step(q, active)
            crossed = martingales[name].log_value >= math.log(1 / delta)
            first[name] = np.where((first[name] < 0) & crossed, t, first[name])
    return first


def _pictures(folder):
    return sorted(glob.glob(os.path.join(folder, "*.png")) + glob.glob(os.path.join(folder, "*.jpg")))


def score_pools(model_path: str, data_root: str, category: str, other: str, blur: float, batch: int = 32) -> dict:
    """Scores of every pool, by name -> (M,) float64, plus "calibration"."""
    from PIL import Image, ImageEnhance, ImageFilter
    from padim import PaDiM

    model = PaDiM.load(model_path)
    changes = {
        "good": lambda im: im,
        "brightness+20%": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
        f"blur{blur:g}": lambda im: im.filter(ImageFilter.GaussianBlur(blur)),
        "rotation5": lambda im: im.rotate(5, resample=Image.BILINEAR),
    }
    sources = {name: (os.path.join(data_root, category, "test", "good"), change) for name, change in changes.items()}
    sources[other] = ([os.path.join(data_root, other, "test", "good"), os.path.join(data_root, other, "train", "good")],
                      changes["good"])
    sources["defect"] = (os.path.join(data_root, category, "test", "defect"), changes["good"])
    pools = {"calibration": np.asarray(model.calibration_.image_scores, dtype=np.float64)}
    for name, (folders, change) in sources.items():
        paths = sum((_pictures(f) for f in ([folders] if isinstance(folders, str) else folders)), [])
        scores = []
        for i in range(0, len(paths), batch):
            images = [change(Image.open(p).convert("RGB")) for p in paths[i:i + batch]]
            scores.append(np.asarray(model.predict(images).scores, dtype=np.float64))
        pools[name] = np.concatenate(scores)
        print(f"  scored {len(paths)} pictures: {name}", flush=True)
    return pools


def _mixed(good: np.ndarray, defect: np.ndarray, rate: float, shape, rng) -> np.ndarray:
    return np.where(rng.random(shape) < rate, rng.choice(defect, shape), rng.choice(good, shape))


def _summary(first: np.ndarray, calm: int, length: int) -> dict:
    """Images after the change until the alarm: median over streams (a stream that never alarmed
    counts as more than ``length``), fraction alarmed, and the fraction that alarmed during the calm part."""
    false = (first >= 0) & (first < calm)
    delay = np.where(first >= calm, first - calm + 1, np.inf)[~false]
    median = float(np.median(delay)) if len(delay) else float("nan")
    return {"median": median if math.isfinite(median) else f"> {length}", "alarmed": float(np.isfinite(delay).mean()),
            "alarmed_while_calm": float(false.mean())}


def real(pools: dict, delta: float, repeats: int, length: int, seed: int, other: str, blur: float, calm: int) -> dict:
    """Real pictures: the pools' scores drawn at random with replacement (i.i.d. from each pool)."""
    rng, cal, results = np.random.default_rng(seed), pools["calibration"], {}
    good, defect = pools["good"], pools["defect"]

    def show(name, first, calm_, n):
        results[name] = {kind: _summary(first[kind], calm_, n) for kind in STREAMS}
        text = [f"{k}: median {v['median']}, alarmed {100 * v['alarmed']:.1f}%"
                + (f" (while calm {100 * v['alarmed_while_calm']:.1f}%)" if calm_ else "") for k, v in results[name].items()]
        print(f"  {name:48s} " + "  ".join(text), flush=True)

    permuted = np.stack([rng.permutation(good) for _ in range(max(repeats, 1000))])
    show(f"no change: test/good permuted ({len(good)}, no repeats)", alarms(cal, permuted, delta, seed), 0, len(good))
    changes = {name: (lambda shape, pool=pools[name]: rng.choice(pool, shape)) for name in
               ("brightness+20%", f"blur{blur:g}", "rotation5", other)}
    changes["defects 5%"] = lambda shape: _mixed(good, defect, 0.05, shape, rng)
    changes["defects 15%"] = lambda shape: _mixed(good, defect, 0.15, shape, rng)
    for name, make in changes.items():
        show(f"from the first image: {name}", alarms(cal, make((repeats, length)), delta, seed), 0, length)
    calm_good = lambda shape: rng.choice(good, shape)  # noqa: E731
    after = {"no change: good pictures": (calm_good, calm_good)}
    after.update({name: (calm_good, changes[name]) for name in ("brightness+20%", f"blur{blur:g}", "rotation5", other)})
    after["defects 5% -> 15% (3x)"] = (changes["defects 5%"], changes["defects 15%"])
    for name, (before, make) in after.items():
        streams = np.concatenate([before((repeats, calm)), make((repeats, length))], 1)
        show(f"after {calm} calm: {name}", alarms(cal, streams, delta, seed), calm, length)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a padim model file (fitted on --category)")
    parser.add_argument("--data-root", default="/work/shared/datasets")
    parser.add_argument("--category", default="elpv_mono")
    parser.add_argument("--other", default="elpv_poly", help="pictures of another set-up, into the same model")
    parser.add_argument("--scores", default="/tmp/drift_scores.npz", help="cache of the pictures' scores")
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--length", type=int, default=1000, help="images per real stream at most")
    parser.add_argument("--calm", type=int, default=1000, help="calm images before the change, second set of streams")
    parser.add_argument("--blur", type=float, default=2.0, help="Gaussian blur radius in pixels (PIL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate-only", action="store_true")
    parser.add_argument("--real-only", action="store_true", help="skip (a)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    out = {"delta": args.delta}
    t0 = time.time()
    if not args.real_only:
        print(f"(a) {args.streams} exchangeable streams of {args.steps} images, delta {args.delta}: "
              "fraction ever alarming")
        for label, kw in (("online p-values, continuous scores, 47 calibration", {}),
                          ("online p-values, integer scores (heavy ties), 47 cal.", {"ties": True}),
                          ("padim's fixed-calibration p-values, 47 cal. (invalid)", {"fixed": True})):
            out[label] = simulate(args.streams, args.steps, args.delta, 47, args.seed, **kw)
            print(f"  {label:55s} " + "  ".join(f"{k}: {v:.4f}" for k, v in out[label].items()), flush=True)
        print(f"  ({time.time() - t0:.0f} s)")
    if not args.simulate_only:
        if os.path.exists(args.scores):
            pools = {k: v for k, v in np.load(args.scores).items()}
        else:
            pools = score_pools(args.model, args.data_root, args.category, args.other, args.blur)
            np.savez(args.scores, **pools)
        print(f"(b) images until alarm at delta {args.delta}, median of {args.repeats} streams "
              f"({len(pools['calibration'])} calibration images; at most {args.length} images after the change)")
        out["real"] = real(pools, args.delta, args.repeats, args.length, args.seed, args.other, args.blur, args.calm)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
