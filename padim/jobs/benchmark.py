"""``padim benchmark``: fit and test every category in turn, one results table and one report.

Resumable: a category whose DIR/<category>/metrics.json exists is read back, not redone (metrics.json
is the last file a category writes, so a run killed mid-category redoes only that one).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from padim.version import __version__
from padim.settings.backbone_table import is_weights_file
from padim.data.mvtec import MVTEC_CATEGORIES
from padim.errors import PadimError
from padim.jobs.report import RESULT_COLUMNS, results_markdown, write_html
from padim.jobs.runs import fit_category, test_category, write_json_atomic, write_text_atomic


def parse_categories(text: str) -> List[str]:
    """'all' -> MVTec AD's 15 categories; 'a,b' -> ['a', 'b']."""
    if text.strip() == "all":
        return list(MVTEC_CATEGORIES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PadimError("`categories` is empty")
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


def run_category(data_root, category: str, folder: Path, max_images: Optional[int], batch_size: int,
                 device: Optional[str], log: Callable[[str], None], tune_malloc: bool, engine: str, precision: str,
                 params: dict) -> dict:
    """Fits and tests one category into ``folder`` -> its test summary (exceptions propagate)."""
    fit_category(data_root, category, folder / "model.safetensors", note=log, batch_size=batch_size,
                 device=device, progress=None, **params)
    return test_category(folder / "model.safetensors", data_root, category, folder, pictures=True,
                         max_images=max_images, device=device, batch_size=batch_size, note=log,
                         tune_malloc=tune_malloc, engine=engine, precision=precision)


def run_benchmark(data_root, categories: Sequence[str], output: Path, force: bool = False,
                  max_images: Optional[int] = None, batch_size: int = 32, device: Optional[str] = None,
                  log: Callable[[str], None] = None, tune_malloc: bool = False, engine: str = "torch",
                  precision: str = "f32", ray: Optional[str] = None, cpus_per_category: int = 1,
                  **params) -> List[Dict]:
    """Fits PaDiM(**params) on each category and tests it; writes per-category folders, then
    results.md/csv/json and report.html (rewritten after every category). Returns the rows.
    tune_malloc, engine, precision: see ``padim.jobs.runs.test_category``.
    ray: run the categories as parallel Ray tasks on that cluster ("local", "HOST:PORT"), each with
    ``cpus_per_category`` CPUs; the data root and output must be at the same paths on every node. The
    metrics are those of the sequential run (the same computation, elsewhere); rows keep the order of
    ``categories`` whatever order the tasks finish in."""
    output = Path(output)
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))  # lines that keep the bar intact
    done_before = {}
    for category in categories:
        done = output / category / "metrics.json"
        if done.is_file() and not force:
            done_before[category] = json.loads(done.read_text())
            log(f"{category}: finished before, read back from {done} (--force redoes it)")
    if ray is not None:
        device = "cpu"  # tasks ask Ray for CPUs only: concurrent categories must not all pick the same GPU
        if is_weights_file(params.get("weights")):  # workers do not share the driver's working directory
            params = {**params, "weights": os.path.abspath(os.fspath(params["weights"]))}
    job = dict(max_images=max_images, batch_size=batch_size, device=device, tune_malloc=tune_malloc, engine=engine,
               precision=precision, params=params)
    todo = [category for category in categories if category not in done_before]
    outcomes = (_on_ray(ray, data_root, todo, output, cpus_per_category, job) if ray is not None and todo else
                ((category, _attempt(data_root, category, output / category, log, job)) for category in todo))
    finished = dict(done_before)
    bar = tqdm(total=len(categories), initial=len(done_before), desc="benchmark", unit="category", disable=None)
    for category, outcome in outcomes:
        bar.update(1)
        finished[category] = outcome
        if "error" in outcome:
            log(f"{category}: FAILED: {outcome['error']}")
            if outcome.get("traceback"):  # a bug in padim: keep its traceback visible
                log(outcome["traceback"])
        else:
            log(f"{category}: image_AUROC {outcome['image_AUROC']:.3f}  pixel_AUROC {_fmt(outcome['pixel_AUROC'])}  "
                f"pixel_AUPRO {_fmt(outcome['pixel_AUPRO'])} (to FPR 0.05: {_fmt(outcome['pixel_AUPRO_05'])})  "
                f"fit {outcome['fit_s']:.1f} s  {outcome['test_ms_per_image']:.1f} ms/image")
        _write_results(output, *_rows(categories, finished), params, device)
    bar.close()
    rows, summaries = _rows(categories, finished)
    _write_results(output, rows, summaries, params, device)
    return rows


def _attempt(data_root, category: str, folder: Path, log, job: dict) -> dict:
    """A category's summary, or {"category", "error"[, "traceback"]}: one bad category must not stop
    the others (Ctrl-C still does)."""
    try:
        return run_category(data_root, category, folder, log=log, **job)
    except Exception as exc:
        failed = {"category": category, "error": _error_text(exc)}
        if not isinstance(exc, PadimError):
            failed["traceback"] = "".join(traceback.format_exception(exc)).rstrip()
        return failed


def _category_task(data_root, category: str, folder: Path, job: dict, threads: int) -> dict:
    """A category on a Ray worker (a process of Ray's: its thread count is set to the task's CPUs)."""
    import torch

    torch.set_num_threads(max(1, threads))
    return _attempt(data_root, category, folder, lambda message: None, job)


def _on_ray(address: str, data_root, categories: Sequence[str], output: Path, cpus: int, job: dict):
    """Yields (category, outcome) as the categories' Ray tasks finish."""
    from padim.cluster.connect import check_task_cpus, connect, get

    ray = connect(address)
    check_task_cpus(ray, cpus, "--cpus-per-category")
    task = ray.remote(num_cpus=cpus)(_category_task)
    pending = {task.remote(str(Path(data_root).resolve()), category, (output / category).resolve(), job, cpus): category
               for category in categories}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        category = pending.pop(ready[0])
        try:
            outcome = get(ray, ready[0])
        except PadimError as exc:  # the task itself was lost (worker killed, out of memory): this category only
            outcome = {"category": category, "error": str(exc)}
        yield category, outcome


def _rows(categories: Sequence[str], finished: Dict[str, dict]):
    """Rows (in the order of ``categories``) and the summaries of the successful ones."""
    rows, summaries = [], {}
    for category in categories:
        outcome = finished.get(category)
        if outcome is None:
            continue
        if "error" in outcome:
            rows.append({"category": category, "error": outcome["error"]})
        else:
            summaries[category] = outcome
            rows.append(_row(outcome))
    return rows, summaries


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
