"""The learning line's parts without a server (issue 28): ``padim update --from-log`` adds exactly the
pictures operators marked good (against ``--add`` of exactly those files) and copies those marked
defect; the uniform sample of scored pictures (inclusion frequencies against size / t); live accuracy
intervals against the Clopper-Pearson formula (SciPy's beta quantiles)."""

import json

import numpy as np
from PIL import Image
from scipy.stats import beta

from padim import PaDiM
from padim.cli import main
from padim.monitor.accuracy import live_accuracy
from padim.monitor.decision_log import DecisionLog, FlaggedStore
from padim.monitor.feedback import OverrideCounter
from padim.monitor.good_sample import GoodSample

from conftest import FAST

FAST_CLI = ["--batch-size", "8", "--device", "cpu"]


def _picture(seed: int) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(60, 200, (64, 64, 3)).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _line(tmp_path):
    """What a served line leaves on disk: a decision log with verdicts, flagged pictures and a sample.
    -> (log folder, kept folder, {name: kept path}). Verdicts, by hand: a, b false alarms (anomalous,
    good); c good and confirmed good; d a defect; e no verdict; f first 'good' then 'defect'; g of another
    model, 'good'; h confirmed good but not kept (the sample dropped it)."""
    log_dir, kept_dir = tmp_path / "log", tmp_path / "kept"
    log, flagged = DecisionLog(log_dir), FlaggedStore(kept_dir, 1e9)
    sample = GoodSample(kept_dir / "good-sample" / "m", 100, 1e9, seed=0)
    cases = {"a": ("anomalous", "m"), "b": ("anomalous", "m"), "c": ("good", "m"), "d": ("anomalous", "m"),
             "e": ("good", "m"), "f": ("anomalous", "m"), "g": ("good", "other"), "h": ("good", "m")}
    paths = {}
    for i, (name, (label, model)) in enumerate(cases.items()):
        record = {"kind": "decision", "request_id": f"r{i}", "index": 0, "model": model, "label": label,
                  "score": float(i), "time": "2026-12-07T10:00:00+00:00"}
        log.write([record])
        store = flagged if label == "anomalous" else sample
        if name != "h":
            paths[name] = (store.add if store is flagged else store.offer)(_picture(i), record, f"{name}.png")
        if label == "anomalous" and name in "ab":
            sample.offer(_picture(i), record, f"{name}.png")  # kept twice: counted once
    verdicts = [("c", "good"), ("a", "good"), ("d", "defect"), ("b", "good"), ("f", "good"), ("g", "good"),
                ("h", "good"), ("f", "defect")]
    for name, truth in verdicts:
        i, (label, model) = list(cases).index(name), cases[name]
        log.write([{"kind": "feedback", "request_id": f"r{i}", "index": 0, "model": model, "truth": truth,
                    "verdict": label}])
    log.close()
    return log_dir, kept_dir, paths


def test_update_from_the_log_adds_exactly_the_pictures_marked_good(synthetic_root, tmp_path, capsys):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    model_file, stats = tmp_path / "m.safetensors", tmp_path / "m.stats"
    fitted = PaDiM(**FAST).fit(train, keep_statistics=True)
    fitted.save(model_file)
    fitted.statistics_.save(stats)
    log_dir, kept_dir, paths = _line(tmp_path)
    out = tmp_path / "from-log.safetensors"
    assert main(["update", "--model", str(model_file), "--statistics", str(stats), "--from-log", str(log_dir),
                 str(kept_dir), "--output", str(out), *FAST_CLI]) == 0
    printed = capsys.readouterr().out
    assert "3 pictures operators marked good (2 of them false alarms)" in printed and "2 marked defect" in printed
    by_hand = tmp_path / "by-hand.safetensors"  # the false alarms first, in the order of their verdicts
    assert main(["update", "--model", str(model_file), "--statistics", str(stats), "--add", str(paths["a"]),
                 str(paths["b"]), str(paths["c"]), "--output", str(by_hand), *FAST_CLI]) == 0
    a, b = PaDiM.load(out, device="cpu"), PaDiM.load(by_hand, device="cpu")
    assert a.n_train_images_ == b.n_train_images_ == len(train) + 3
    assert np.array_equal(a.mean_.numpy(), b.mean_.numpy())
    assert np.array_equal(a.precision_factor_packed_.numpy(), b.precision_factor_packed_.numpy())
    defects = tmp_path / "from-log-defects"
    labels = [json.loads(line) for line in (defects / "labels.jsonl").read_text().splitlines()]
    assert sorted((r["request_id"], r["truth"], r["verdict"]) for r in labels) == [("r3", "defect", "anomalous"),
                                                                                    ("r5", "defect", "anomalous")]
    assert all((defects / r["picture"]).read_bytes() == _picture(int(r["request_id"][1:])) for r in labels)


def test_update_from_a_folder_without_a_log_is_one_line(synthetic_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["update", "--model", "m.safetensors", "--statistics", "s", "--from-log", str(tmp_path / "empty"),
                 "--output", str(tmp_path / "o.safetensors")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["update", "--model", "m.safetensors", "--statistics", "s", "--output", str(tmp_path / "o.safetensors")]) == 1
    assert "--add" in capsys.readouterr().err


def test_the_sample_keeps_each_picture_with_probability_size_over_t(tmp_path):
    """Algorithm R: after t pictures each is in the sample with probability size / t (here 4 / 20);
    over 300 seeded runs every picture's frequency is within 4 standard deviations of it."""
    size, t, runs = 4, 20, 300
    counts = np.zeros(t)
    for run in range(runs):
        sample = GoodSample(tmp_path / f"s{run}", size, 1e9, seed=run)
        for i in range(t):
            sample.offer(b"x", {"i": i}, f"{i}.png")
        kept = [sample.metadata(p)["i"] for p in sample.items()]
        assert len(kept) == size == len(set(kept))
        counts[kept] += 1
    p = size / t
    assert np.all(np.abs(counts / runs - p) <= 4 * np.sqrt(p * (1 - p) / runs))
    sample.restart()
    assert sample.items() == [] and sample.seen == 0
    assert GoodSample(tmp_path / f"s{runs - 1}", size, 1e9).seen == 0


def test_live_accuracy_intervals_are_clopper_pearson_and_warn_above_the_target():
    def exact(k, n):  # the textbook formula with beta quantiles
        return [0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1), 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)]

    counter = OverrideCounter()
    counter.remember("r1", ["anomalous"] * 6 + ["good"] * 14, version="v1")
    counter.remember("r2", ["good", "anomalous"], version="v2")
    for i in range(20):
        counter.feedback("r1", i, "good" if i != 0 else "defect")
    counter.feedback("r2", 0, "defect")
    states = counter.by_version()
    v1 = live_accuracy(states["v1"]["counts"], 0.05)
    assert (v1["false_alarms"]["errors"], v1["false_alarms"]["of"]) == (5, 19)
    np.testing.assert_allclose(v1["false_alarms"]["interval"], exact(5, 19), rtol=1e-9)
    assert v1["warning"] is not None and "above the target 5 %" in v1["warning"]  # 5/19 with a lower bound > 5 %
    assert v1["missed_defects"]["of"] == 1 and v1["missed_defects"]["errors"] == 0
    v2 = live_accuracy(states["v2"]["counts"], 0.05)
    assert v2["false_alarms"]["interval"] is None and v2["missed_defects"]["rate"] == 1.0
    np.testing.assert_allclose(v2["missed_defects"]["interval"], exact(1, 1), rtol=1e-9)
    assert live_accuracy({"anomalous/good": 1, "good/good": 99}, 0.05)["warning"] is None
