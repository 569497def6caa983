"""Pictures and the HTML report: defect panels, ROC curves, score histograms, one results page.

Everything is drawn with matplotlib's object API (a ``Figure`` saved to PNG through the Agg canvas),
never through pyplot, so that drawing a report leaves the host process's plotting backend (a
notebook's, say) as it was. report.html refers to the PNGs by relative paths, so the output folder
can be moved, zipped or opened from disk.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from padim.settings.calibration import masks_at
from padim.files.atomic import atomic_write
from padim.render.visualize import heatmap_overlay

# the seed's columns, then the figures at the calibrated thresholds (n/a for a model without calibration)
RESULT_COLUMNS = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO", "pixel_AUPRO_05", "fit_s", "ms_per_image",
                  "good_FPR_calibrated", "image_recall_calibrated", "image_F1_calibrated", "pixel_F1_calibrated")


def defect_panel(image, gt_mask: Optional[np.ndarray], anomaly_map: np.ndarray, threshold: float,
                 vmax: float, title: str, path: Path) -> None:
    """input | ground truth | heatmap over the image | predicted mask outline, as one PNG.

    image: PIL image at the map's size; gt_mask, anomaly_map: (H, W); threshold: pixel threshold.
    """
    rgb = np.asarray(image.convert("RGB"))
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 4)
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    axes[1].imshow(gt_mask if gt_mask is not None else np.zeros(anomaly_map.shape), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth" if gt_mask is not None else "ground truth (none)")
    axes[2].imshow(np.asarray(heatmap_overlay(image, anomaly_map, 0.0, vmax)))
    axes[2].set_title("anomaly map")
    axes[3].imshow(rgb)
    predicted = masks_at(anomaly_map, threshold)  # the one decision rule
    if predicted.any():
        axes[3].contour(predicted, levels=[0.5], colors="red", linewidths=1.5)
    axes[3].set_title("predicted mask")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def roc_figure(labels: np.ndarray, scores: np.ndarray, image_auroc: float,
               pixel_curve, pixel_auroc: float, path: Path) -> None:
    """Image- and pixel-level ROC curves, AUROC in the legend. pixel_curve None: no ground-truth
    defect pixels, the image curve only."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fig = Figure(figsize=(4.5, 4.2))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"image (AUROC {image_auroc:.3f})")
    if pixel_curve is not None:
        ax.plot(*pixel_curve, label=f"pixel (AUROC {pixel_auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def score_histogram(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> None:
    """Image scores of good vs defective test images, with the image threshold marked."""
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(scores, bins=30)
    ax.hist(scores[~labels], bins=bins, alpha=0.6, label="good")
    ax.hist(scores[labels], bins=bins, alpha=0.6, label="defective")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, so nothing global to set or close
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80), what="picture")


def _cell(value) -> str:
    """A table cell: floats with two decimals; None (a metric not available) is "n/a"."""
    if isinstance(value, float):
        return f"{value:.2f}"
    return "n/a" if value is None else str(value)


def results_markdown(rows: Sequence[Dict]) -> str:
    """The results table: one row per category (an error row where a category failed), then Mean."""
    lines = ["| Category | " + " | ".join(RESULT_COLUMNS) + " |", "|---" * (len(RESULT_COLUMNS) + 1) + "|"]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['category']} | " + " | ".join(["-"] * len(RESULT_COLUMNS)) + f" |  error: {row['error']}")
        else:
            lines.append(f"| {row['category']} | " + " | ".join(_cell(row.get(c)) for c in RESULT_COLUMNS) + " |")
    means = _means(rows)
    if means:
        lines.append("| Mean | " + " | ".join(_cell(means[c]) for c in RESULT_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_html(path: Path, title: str, rows: Sequence[Dict], info: Dict, sections: Dict[str, List[str]]) -> None:
    """report.html: the results table, then per category its curves and a gallery of panels.

    The table sits in its own box that scrolls sideways (``overflow-x: auto``): its twelve columns
    are wider than a laptop's page, and the page itself keeps the window's width.

    sections: category -> image paths relative to the report's folder (curves first, then panels).
    A small inline script counts images that failed to load and marks the page (data-broken-images),
    so a headless browser check can tell that every picture showed.
    """
    head_cells = "".join(f"<th>{html.escape(c)}</th>" for c in ("Category",) + RESULT_COLUMNS)
    body_rows = []
    for row in list(rows) + ([{"category": "Mean", **_means(rows)}] if _means(rows) else []):
        if row.get("error"):
            cells = f"<td colspan='{len(RESULT_COLUMNS)}' class='error'>error: {html.escape(str(row['error']))}</td>"
        else:
            cells = "".join(f"<td>{_cell(row.get(c))}</td>" for c in RESULT_COLUMNS)
        body_rows.append(f"<tr><th>{html.escape(str(row['category']))}</th>{cells}</tr>")
    info_items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in info.items())
    parts = []
    for category, images in sections.items():
        pictures = "".join(f"<img src='{html.escape(src)}' alt='{html.escape(Path(src).stem)}' loading='eager'>"
                           for src in images)
        parts.append(f"<section id='{html.escape(category)}'><h2>{html.escape(category)}</h2>"
                     f"<div class='gallery'>{pictures}</div></section>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
th:first-child {{ text-align: left; }} td.error {{ color: #b00; text-align: left; }}
.table-box {{ overflow-x: auto; max-width: 100%; }}
.gallery img {{ max-width: 100%; margin: 6px 0; display: block; }}
</style></head>
<body data-broken-images="unknown">
<h1>{html.escape(title)}</h1>
<ul>{info_items}</ul>
<div class="table-box"><table id="results"><thead><tr>{head_cells}</tr></thead><tbody>{''.join(body_rows)}</tbody></table></div>
<p>Metrics are in [0, 1]; fit_s is the fit time in seconds, ms_per_image the test time per image, decoding
included. Oracle and calibrated side by side: image_F1Score and pixel_F1Score use the best threshold for
this very test set, which no production line has; the <code>*_calibrated</code> columns use the thresholds
fixed at fit time from good training images only (a target false-positive rate), which is what a line
sees: good_FPR_calibrated is the share of good test images flagged, image_recall_calibrated the share of
defect images caught.</p>
{''.join(parts)}
<script>
window.addEventListener("load", function () {{
  var broken = Array.prototype.filter.call(document.images, function (img) {{ return !(img.complete && img.naturalWidth > 0); }});
  document.body.setAttribute("data-broken-images", String(broken.length));
  document.body.setAttribute("data-images", String(document.images.length));
}});
</script>
</body></html>
"""
    data = page.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data), what="report")


def _means(rows: Sequence[Dict]) -> Dict:
    """Column means over the rows without error; a column's None values (not available) are left
    out, and a column with no value at all has mean None."""
    good = [row for row in rows if not row.get("error")]
    if not good:
        return {}
    values = {c: [row[c] for row in good if row.get(c) is not None] for c in RESULT_COLUMNS}
    return {c: float(np.mean(v)) if v else None for c, v in values.items()}
