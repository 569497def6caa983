"""The operators' verdicts, joined with the pictures the service kept (issue 28: ``padim update
--from-log``): what the model learns from next.

A served line leaves three things on disk: the decision log (``--log-decisions DIR``: one line per
decision, and one per operator verdict, ``"kind": "feedback"``), the flagged pictures
(``--keep-flagged DIR``) and the sample of scored pictures (``DIR/good-sample/NAME``), each picture
with a JSON sidecar holding its decision (``request_id``, ``index``, ``label``, ``model``). A
picture's verdict is the last feedback line on its (request_id, index). Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from padim.monitor.decision_log import DecisionLogError

_LOG_FILE = re.compile(r"^decisions-\d{5,}\.jsonl$")
_KEPT_PICTURE = re.compile(r"^\d{10}-[A-Za-z0-9._-]+$")


@dataclass
class Verdicts:
    """good: pictures operators marked good, the model's false alarms first (then in the order they were
    kept); defect: (picture, its decision record with ``truth``) of those marked defect; models: the
    model names seen; feedback: verdict lines read; unmatched: verdicts whose picture was not kept."""

    good: List[Path] = field(default_factory=list)
    false_alarms: int = 0
    defect: List[Tuple[Path, dict]] = field(default_factory=list)
    models: List[str] = field(default_factory=list)
    feedback: int = 0
    unmatched: int = 0


def _lines(path: Path):
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            yield json.loads(line)
        except ValueError:
            raise DecisionLogError(f"decision log {path}, line {number}: not JSON") from None


def read_verdicts(folders: Sequence[Path], model: Optional[str] = None) -> Verdicts:
    """The verdicts in the decision-log files and the kept pictures under ``folders`` (searched
    recursively); with ``model``, only that served model's. Raises DecisionLogError when a folder
    is missing or holds no decision log."""
    truths: Dict[tuple, dict] = {}
    kept: Dict[tuple, Tuple[Path, dict]] = {}
    n_logs = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DecisionLogError(f"--from-log {folder} is not a folder")
        for path in sorted(folder.rglob("*")):
            if _LOG_FILE.match(path.name) and path.is_file():
                n_logs += 1
                for record in _lines(path):
                    if record.get("kind") == "feedback" and (model is None or record.get("model") == model):
                        truths[(record.get("request_id"), record.get("index"))] = record  # the last one wins
            elif _KEPT_PICTURE.match(path.name) and path.is_file():
                try:
                    meta = json.loads(Path(str(path) + ".json").read_text())
                except (OSError, ValueError):
                    continue  # a picture without its sidecar: a kept item a kill cut short
                if model is None or meta.get("model") == model:
                    kept.setdefault((meta.get("request_id"), meta.get("index")), (path, meta))
    if not n_logs:
        raise DecisionLogError(f"no decision log (decisions-*.jsonl) under {', '.join(str(f) for f in folders)}: "
                               "give the folder of padim serve --log-decisions")
    found = Verdicts(feedback=len(truths), models=sorted({str(r.get("model")) for r in truths.values()}))
    good = []
    for key, record in truths.items():
        if key not in kept:
            found.unmatched += 1
            continue
        path, meta = kept[key]
        if record.get("truth") == "good":
            good.append((record.get("verdict") != "anomalous", path))
        elif record.get("truth") == "defect":
            found.defect.append((path, {**meta, "truth": "defect", "verdict": record.get("verdict")}))
    good.sort(key=lambda item: item[0])  # stable: the false alarms first, each group in its kept order
    found.good = [path for _, path in good]
    found.false_alarms = sum(1 for called_good, _ in good if not called_good)
    return found


def keep_labelled(defects: Sequence[Tuple[Path, dict]], folder: Path) -> int:
    """Copies the pictures operators marked defect into ``folder`` (a labelled set beside the model:
    pictures of real defects, for testing the next model) and appends each one's decision and verdict
    to ``folder/labels.jsonl``; a picture already there (same request_id and index) is not copied
    again. -> how many were added."""
    from padim.files.atomic import atomic_write
    from padim.monitor.decision_log import encode_lines

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = folder / "labels.jsonl"
    known = set()
    if labels.is_file():
        known = {(r.get("request_id"), r.get("index")) for r in _lines(labels)}
    added = []
    for path, record in defects:
        if (record.get("request_id"), record.get("index")) in known:
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DecisionLogError(f"kept picture {path} cannot be read ({exc.strerror or exc}): was it dropped "
                                   "while this ran?") from None
        name = f"{record.get('request_id')}-{record.get('index')}-{path.name[11:] or path.name}"  # unique per image
        atomic_write(folder / name, lambda f: f.write(data), DecisionLogError, "labelled picture")
        added.append({**record, "picture": name})
    if added:
        with open(labels, "ab") as handle:
            handle.write(encode_lines(added))
    return len(added)
