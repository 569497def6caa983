"""The decision log, flagged-image store and override counter (padim.monitor.decision_log): whole
JSON lines after kill -9 (a real writer process killed 20 times), one write per batch, rotation that
never touches an old file, no NaN on disk, bounded flagged images, feedback counts."""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from padim.monitor.decision_log import DecisionLog, DecisionLogError, FlaggedStore
from padim.monitor.feedback import OverrideCounter

ROOT = Path(__file__).resolve().parents[1]


def _strict(line: bytes):
    """json.loads that refuses NaN and Infinity, as a strict parser would."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} written"))


def _lines(folder: Path):
    out = []
    for path in sorted(folder.glob("decisions-*.jsonl")):
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path.name} ends in a partial line"
        out += [_strict(line) for line in data.splitlines()]
    return out


def test_batches_rotate_and_old_files_are_never_rewritten(tmp_path):
    log = DecisionLog(tmp_path, max_bytes=2000)
    digests = {}
    for batch in range(60):
        log.write([{"batch": batch, "i": i, "name": "x" * (batch % 7 * 10)} for i in range(1 + batch % 5)])
        for path in log.files()[:-1]:  # every file but the one being appended to is final
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digests.setdefault(path.name, digest) == digest, f"{path.name} was rewritten"
    log.write([{"big": "y" * 5000}])  # larger than max_bytes: whole, in a file of its own
    log.close()
    names = [p.name for p in sorted(tmp_path.glob("decisions-*.jsonl"))]
    assert names[0] == "decisions-00001.jsonl" and len(names) >= 5
    assert all(os.path.getsize(tmp_path / n) <= 2000 for n in names[:-1])
    records = _lines(tmp_path)
    assert [(r["batch"], r["i"]) for r in records[:-1]] == [(b, i) for b in range(60) for i in range(1 + b % 5)]
    assert len(_strict((tmp_path / names[-1]).read_bytes())["big"]) == 5000
    reopened = DecisionLog(tmp_path, max_bytes=2000)  # continues after the newest file
    reopened.write([{"after": True}])
    reopened.close()
    assert _lines(tmp_path)[-1] == {"after": True} and reopened.torn_bytes == 0


def test_non_finite_and_numpy_values_become_json(tmp_path):
    with DecisionLog(tmp_path) as log:
        log.write([{"score": float("nan"), "p": np.float32("inf"), "n": np.int64(3), "ok": np.bool_(True),
                    "map": np.array([1.0, np.nan]), "nested": {"x": (float("-inf"), 2)}, "text": "a\nb é"}])
    assert _lines(tmp_path) == [{"score": None, "p": None, "n": 3, "ok": True, "map": [1.0, None],
                                 "nested": {"x": [None, 2]}, "text": "a\nb é"}]


def test_one_write_per_batch(tmp_path, monkeypatch):
    log = DecisionLog(tmp_path)
    calls = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append(bytes(data)) or real_write(fd, data))
    log.write([{"i": i, "pad": "z" * 300} for i in range(40)])  # ~13 kB: several pages, one call
    log.write([])
    monkeypatch.undo()
    log.close()
    assert len(calls) == 1 and calls[0].endswith(b"\n") and calls[0].count(b"\n") == 40


def test_threads_never_interleave_batches(tmp_path):
    log = DecisionLog(tmp_path, max_bytes=50_000)

    def work(t):
        for b in range(40):
            log.write([{"thread": t, "batch": b, "i": i} for i in range(10)])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = _lines(tmp_path)
    assert len(records) == 8 * 40 * 10
    for start in range(0, len(records), 10):  # each batch is 10 adjacent lines, in order
        group = records[start:start + 10]
        assert [r["i"] for r in group] == list(range(10)) and len({(r["thread"], r["batch"]) for r in group}) == 1


_WRITER = textwrap.dedent("""
    import sys
    from padim.monitor.decision_log import DecisionLog
    log = DecisionLog(sys.argv[1], max_bytes=200_000)
    print("torn", log.torn_bytes, flush=True)
    batch = int(sys.argv[2])
    while True:
        n = 1 + batch % 97  # 1 .. 97 records: up to ~25 kB, across page boundaries
        pad = "p" * (batch % 300)
        log.write([{"batch": batch, "i": i, "of": n, "pad": pad, "score": float("nan")} for i in range(n)])
        print("ok", batch, flush=True)
        batch += 1
""")


def test_kill_9_leaves_only_whole_lines(tmp_path):
    """A writer process under load is killed with SIGKILL 20 times (restarted each time, which is when
    a torn tail is cut). Files older than the newest are whole at every moment; the newest is whole
    once reopened; every acknowledged batch is there, complete; of a batch whose write the kill cut
    (Linux stops a multi-page write at a page when a fatal signal is pending), only whole first lines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng, acknowledged, next_batch, torn = np.random.default_rng(0), set(), 0, 0
    for kill in range(20):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(next_batch)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().startswith("torn")
        time.sleep(0.05 + 0.25 * rng.random())
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        batches = [int(line[3:]) for line in out.splitlines() if re.fullmatch(r"ok \d+", line)]  # whole acks only
        assert batches, "the writer wrote nothing before it was killed"
        acknowledged.update(batches)
        next_batch = max(batches) + 1000  # batch ids never repeat across runs
        for path in sorted(tmp_path.glob("decisions-*.jsonl"))[:-1]:
            for line in path.read_bytes().splitlines(keepends=True):
                assert line.endswith(b"\n") and _strict(line)
        newest = sorted(tmp_path.glob("decisions-*.jsonl"))[-1].read_bytes()
        torn += len(newest) - (newest.rfind(b"\n") + 1)
    log = DecisionLog(tmp_path, max_bytes=200_000)  # what the service does when it starts again
    log.close()
    records = _lines(tmp_path)  # every line of every file: whole, strict JSON
    assert len(list(tmp_path.glob("decisions-*.jsonl"))) > 1  # rotation happened under the kills
    found = {}
    for r in records:
        found.setdefault(r["batch"], []).append(r["i"])
        assert r["score"] is None
    for batch in acknowledged:
        n = 1 + batch % 97
        assert sorted(found.get(batch, [])) == list(range(n)), f"acknowledged batch {batch} lost or partial"
    for batch, seen in found.items():  # unacknowledged: whole, or a torn write's whole first lines
        assert seen == list(range(len(seen))) and len(seen) <= 1 + batch % 97, (batch, seen)
    cut = sum(len(v) < 1 + b % 97 for b, v in found.items())
    print(f"torn tails seen before reopening: {torn} bytes; batches kept in part: {cut}")


def test_torn_tail_is_cut_when_opened(tmp_path):
    (tmp_path / "decisions-00003.jsonl").write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    log = DecisionLog(tmp_path)
    assert log.torn_bytes == 5 and log.path.name == "decisions-00003.jsonl"
    log.write([{"d": 4}])
    log.close()
    assert _lines(tmp_path) == [{"a": 1}, {"b": 2}, {"d": 4}]


def test_a_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    log = DecisionLog(tmp_path)
    log.write([{"first": 1}])
    real_write = os.write

    def half_then_full_disk(fd, data):
        if len(data) > 50:
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full_disk)
    with pytest.raises(DecisionLogError, match="no space left.*not logged"):
        log.write([{"second": "s" * 100}])
    monkeypatch.undo()
    log.write([{"third": 3}])
    log.close()
    assert _lines(tmp_path) == [{"first": 1}, {"third": 3}]


def test_one_process_per_folder(tmp_path):
    first = DecisionLog(tmp_path)
    with pytest.raises(DecisionLogError, match="in use by another process"):
        DecisionLog(tmp_path)
    first.close()
    DecisionLog(tmp_path).close()
    with pytest.raises(DecisionLogError, match="max_bytes must be a positive integer"):
        DecisionLog(tmp_path, max_bytes=0)
    with pytest.raises(DecisionLogError, match="closed"):
        first.write([{"x": 1}])


def test_flagged_store_is_bounded_oldest_first(tmp_path):
    store = FlaggedStore(tmp_path, max_bytes=10_000)
    kept = [store.add(bytes([i]) * 2000, {"score": float("nan"), "i": i}, name=f"part {i}/../x.png") for i in range(12)]
    assert all(p is not None and p.parent == tmp_path and " " not in p.name for p in kept)
    assert store.total_bytes <= 10_000
    items = store.items()
    survivors = [int(json.loads(Path(str(p) + ".json").read_text())["i"]) for p in items]
    assert survivors == list(range(12 - len(items), 12)) and len(items) >= 3  # the newest, in order
    assert json.loads(Path(str(items[0]) + ".json").read_text())["score"] is None
    assert not [p for p in tmp_path.iterdir() if p not in items and Path(str(p)[:-5]) not in items]
    assert store.add(b"x" * 20_000, {}) is None  # alone bigger than the bound: not kept
    (tmp_path / "9999999998-orphan.png").write_bytes(b"half an item")  # its sidecar never written
    again = FlaggedStore(tmp_path, max_bytes=10_000)
    assert again.items() == items and not (tmp_path / "9999999998-orphan.png").exists()
    newest = again.add(b"n" * 2000, {"i": 99})
    assert int(newest.name[:10]) > int(items[-1].name[:10]) and again.total_bytes <= 10_000
    with pytest.raises(DecisionLogError, match="max_bytes must be a positive number"):
        FlaggedStore(tmp_path, max_bytes=0)


def test_override_counter():
    counter = OverrideCounter(max_requests=2)
    assert counter.state()["override_rate"] is None
    counter.remember("r1", ["good", "anomalous", None])
    assert counter.feedback("r1", 0, "defect") == {"verdict": "good", "truth": "defect", "override": True}
    assert counter.feedback("r1", 1, "defect")["override"] is False
    state = counter.state()
    assert (state["feedback"], state["overrides"], state["override_rate"], state["missed_defects"]) == (2, 1, 0.5, 1)
    counter.feedback("r1", 0, "good")  # the operator corrects the first verdict: replaced, not added
    assert (counter.state()["feedback"], counter.state()["overrides"]) == (2, 0)
    for bad, words in (((("r1", 2, "good")), "no verdict"), (("r1", 5, "good"), "index must be"),
                       (("r1", 0, "maybe"), "truth must be"), (("nope", 0, "good"), "unknown request_id")):
        with pytest.raises(DecisionLogError, match=words):
            counter.feedback(*bad)
    counter.remember("r2", ["good"])
    counter.remember("r3", ["good"])  # r1 is forgotten (max_requests=2); its counts stay
    with pytest.raises(DecisionLogError, match="unknown request_id"):
        counter.feedback("r1", 0, "good")
    assert counter.state()["feedback"] == 2
    json.dumps(counter.state(), allow_nan=False)
