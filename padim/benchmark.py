"""``padim benchmark``: fit and test every category in turn, one results table and one report.

Resumable: a category whose DIR/<category>/metrics.json exists is read back, not redone (metrics.json
is the last file a category writes, so a run killed mid-category redoes only that one).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from . import __version__
from .data.mvtec import MVTEC_CATEGORIES
from .errors import PadimError
from .report import RESULT_COLUMNS, results_markdown, write_html
from .runs import fit_category, test_category, write_json_atomic, write_text_atomic


def parse_categories(text: str) -> List[str]:
    """'all' -> MVTec AD's 15 categories; 'a,b' -> ['a', 'b']."""
    if text.strip() == "all":
        return list(MVTEC_CATEGORIES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PadimError("--categories is empty")
    return names


def _row(summary: dict) -> dict:
    row = {"category": summary["category"]}
    row.update({c: summary[c] for c in RESULT_COLUMNS if c in summary})
    row["ms_per_image"] = summary["test_ms_per_image"]
    return row


def _error_text(exc: BaseException) -> str:
    """One line for a failed category's row: the message of a user error; for anything else (a bug
    or an unexpected library error) the exception type too, so it is not mistaken for bad data."""
    message = " ".join(str(exc).split())
    if isinstance(exc, PadimError):
        return message
    return f"unexpected {type(exc).__name__}: {message} (a bug in padim? the log has the traceback)"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_benchmark(data_root, categories: Sequence[str], output: Path, force: bool = False,
                  max_images: Optional[int] = None, batch_size: int = 32, device: Optional[str] = None,
                  log: Callable[[str], None] = None, tune_malloc: bool = False, engine: str = "torch",
                  precision: str = "f32", **params) -> List[Dict]:
    """Fits PaDiM(**params) on each category and tests it; writes per-category folders, then
    results.md/csv/json and report.html (rewritten after every category). Returns the rows.
    tune_malloc, engine, precision: see ``padim.runs.test_category``."""
    output = Path(output)
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))  # lines that keep the bar intact
    rows, summaries = [], {}
    for category in tqdm(categories, desc="benchmark", unit="category", disable=None):
        folder = output / category
        done = folder / "metrics.json"
        if done.is_file() and not force:
            summary = json.loads(done.read_text())
            log(f"{category}: finished before, read back from {done} (--force redoes it)")
        else:
            try:
                fit_category(data_root, category, folder / "model.safetensors", note=log, batch_size=batch_size,
                             device=device, progress=None, **params)
                summary = test_category(folder / "model.safetensors", data_root, category, folder, pictures=True,
                                        max_images=max_images, device=device, batch_size=batch_size, note=log,
                                        tune_malloc=tune_malloc, engine=engine, precision=precision)
            except Exception as exc:  # one bad category must not stop the others (Ctrl-C still does)
                rows.append({"category": category, "error": _error_text(exc)})
                log(f"{category}: FAILED: {_error_text(exc)}")
                if not isinstance(exc, PadimError):  # a bug in padim: keep its traceback visible
                    log("".join(traceback.format_exception(exc)).rstrip())
                _write_results(output, rows, summaries, params, device)
                continue
            log(f"{category}: image_AUROC {summary['image_AUROC']:.3f}  pixel_AUROC {_fmt(summary['pixel_AUROC'])}  "
                f"pixel_AUPRO {_fmt(summary['pixel_AUPRO'])}  fit {summary['fit_s']:.1f} s  "
                f"{summary['test_ms_per_image']:.1f} ms/image")
        summaries[category] = summary
        rows.append(_row(summary))
        _write_results(output, rows, summaries, params, device)
    return rows


def _write_results(output: Path, rows: List[Dict], summaries: Dict[str, dict], params: dict, device) -> None:
    first = next(iter(summaries.values()), {})
    info = {
        "backbone": first.get("backbone", params.get("backbone")),
        "weights_source": first.get("weights_source", params.get("weights")),
        "n_features": first.get("n_features", params.get("n_features")),
        "reduction": first.get("reduction", params.get("reduction", "random")),
        "covariance": first.get("covariance", params.get("covariance", "fixed")),
        "image_size": first.get("image_size", params.get("image_size")),
        "seed": first.get("seed", params.get("seed")),
        "padim_version": __version__,
        "device": first.get("device", device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "results.md", results_markdown(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", *RESULT_COLUMNS, "error"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{k: "n/a" if v is None else v for k, v in row.items()} for row in rows])
    write_text_atomic(output / "results.csv", buffer.getvalue())
    write_json_atomic(output / "results.json", {**info, "rows": rows})
    sections = {name: [f"{name}/{p}" for p in s.get("pictures", [])] for name, s in summaries.items()}
    if first.get("random_weights"):
        info["warning"] = "RANDOM backbone weights: for tests only"
    write_html(output / "report.html", "padim results", rows, info, sections)
