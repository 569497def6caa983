"""The accuracy options of issue 15: the semi-orthogonal reduction and the shrinkage covariances.

References are independent: NumPy (QR, an upsample-concatenate-multiply embedding, the OAS formula
written out), scikit-learn's ``oas`` / ``ledoit_wolf``, and safetensors' own reader for files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.covariance import ledoit_wolf, oas

from conftest import FAST
from modelfile_helpers import padim_header, rewrite
from padim.cli import main
from padim.settings.config import PadimConfig
from padim.data import find_category
from padim.errors import ModelFileError, PadimError
from padim.core.features import embed, make_reduction, semi_orthogonal_projection
from padim.core.gaussian import GaussianAccumulator, unpack_lower
from padim.core.estimator import PaDiM
from padim.core.statistics import FitStatistics, StatisticsFileError, StatisticsMismatchError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("n_channels, d", [(448, 100), (176, 176), (1792, 550), (5, 1)])
def test_projection_is_orthonormal(n_channels, d):
    w = semi_orthogonal_projection(n_channels, d, seed=3)
    assert w.shape == (n_channels, d) and w.dtype == torch.float32
    gram = w.double().numpy().T @ w.double().numpy()
    np.testing.assert_allclose(gram, np.eye(d), rtol=0, atol=1e-6)


def test_projection_is_deterministic_from_the_seed_and_is_numpys_qr_of_the_seeded_gaussian():
    a = semi_orthogonal_projection(448, 100, seed=0)
    assert torch.equal(a, semi_orthogonal_projection(448, 100, seed=0))
    assert not torch.allclose(a, semi_orthogonal_projection(448, 100, seed=1), atol=1e-2)
    # reference: the same seeded Gaussian, NumPy's (LAPACK's) QR, signs so that diag(R) > 0
    gaussian = torch.randn(448, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    q, r = np.linalg.qr(gaussian)
    expected = q * np.sign(np.diag(r))
    np.testing.assert_allclose(a.numpy(), expected, rtol=0, atol=1e-6)


def test_reductions_say_which_channels_they_read():
    idx, projection = make_reduction(448, 100, 0, "random")
    assert projection is None and len(idx) == 100
    idx, projection = make_reduction(448, 100, 0, "semi-orthogonal")
    assert torch.equal(idx, torch.arange(448)) and projection.shape == (448, 100)
    with pytest.raises(ValueError, match="reduction"):
        make_reduction(448, 100, 0, "pca")


@pytest.mark.parametrize("shapes, grid", [([(2, 4, 8, 8), (2, 6, 4, 4), (2, 5, 2, 2)], 8),  # whole factors
                                          ([(2, 3, 7, 7), (2, 4, 4, 3)], 7)])  # not: nearest picks floor(i * in / out)
def test_projected_embedding_equals_upsample_concatenate_then_multiply(shapes, grid):
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=s).astype(np.float32) for s in shapes]
    n_channels = sum(s[1] for s in shapes)
    w = semi_orthogonal_projection(n_channels, 5, seed=2)

    def nearest(m):  # (B, C, h, w) -> (B, C, grid, grid)
        rows, cols = (np.arange(grid) * m.shape[2]) // grid, (np.arange(grid) * m.shape[3]) // grid
        return m[:, :, rows][:, :, :, cols]

    full = np.concatenate([nearest(m) for m in maps], axis=1).transpose(0, 2, 3, 1)  # (B, grid, grid, C)
    expected = full.astype(np.float64) @ w.double().numpy()
    ours = embed([torch.from_numpy(m).contiguous(memory_format=torch.channels_last) for m in maps],
                 torch.arange(n_channels), projection=w)
    assert ours.shape == (2, grid, grid, 5)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- shrinkage
def _embeddings(seed, n_img=30, n_pos=6, n_ch=8, offset=50.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n_ch, n_ch))  # correlated channels of unequal scales
    return rng.normal(size=(n_img, n_pos, n_ch)) @ mixing * rng.uniform(0.2, 3, n_ch) + offset


def _numpy_oas(x):
    """OAS written out from its definition (Chen et al. 2010, as the issue states it), in NumPy."""
    n, p = x.shape
    centred = x - x.mean(axis=0)
    s = centred.T @ centred / n
    mu = np.trace(s) / p
    alpha = np.mean(s ** 2)
    shrinkage = min((alpha + mu ** 2) / ((n + 1) * (alpha - mu ** 2 / p)), 1.0)
    return (1 - shrinkage) * s + shrinkage * mu * np.eye(p), shrinkage


def _accumulated(x, splits=(7, 23), chunk=4):
    acc = GaussianAccumulator(chunk=chunk)
    start = 0
    for size in splits:
        acc.update(torch.from_numpy(x[start : start + size]))
        start += size
    return acc


@pytest.mark.parametrize("n_img", [30, 5])  # more and fewer images than channels
def test_oas_matches_numpy_and_scikit_learn(n_img):
    x = _embeddings(0, n_img=n_img)
    acc = _accumulated(x, splits=(2, n_img - 2))
    covariance, shrinkage = acc.covariance(covariance="oas").numpy(), acc.shrinkage("oas").numpy()
    for p in range(x.shape[1]):
        expected, expected_shrinkage = _numpy_oas(x[:, p])
        np.testing.assert_allclose(covariance[p], expected, rtol=1e-9, atol=1e-9)
        assert shrinkage[p] == pytest.approx(expected_shrinkage, rel=1e-9)
        reference, reference_shrinkage = oas(x[:, p])
        np.testing.assert_allclose(covariance[p], reference, rtol=1e-9, atol=1e-9)
        assert shrinkage[p] == pytest.approx(reference_shrinkage, rel=1e-9)


@pytest.mark.parametrize("n_img", [30, 5])
def test_ledoit_wolf_from_streamed_fourth_moments_matches_scikit_learn(n_img):
    x = _embeddings(1, n_img=n_img)
    acc = _accumulated(x, splits=(3, n_img - 3))
    covariance, shrinkage = acc.covariance(covariance="ledoit-wolf").numpy(), acc.shrinkage("ledoit-wolf").numpy()
    for p in range(x.shape[1]):
        reference, reference_shrinkage = ledoit_wolf(x[:, p])
        np.testing.assert_allclose(covariance[p], reference, rtol=1e-8, atol=1e-8)
        assert shrinkage[p] == pytest.approx(reference_shrinkage, rel=1e-7)


def test_fourth_moments_merge_recentre_and_subtract_exactly():
    x = _embeddings(2, n_img=40)
    whole = _accumulated(x, splits=(40,), chunk=4)
    first, second = _accumulated(x[:15], splits=(15,), chunk=4), _accumulated(x[15:] , splits=(25,), chunk=3)
    merged = first.merged(second)  # other shift, other blocks: re-cut and re-centred
    part = GaussianAccumulator(whole.chunk, whole.shift)
    part.update(torch.from_numpy(x[15:]))
    rest = whole.without(part)  # = the first 15 images, around whole's shift
    for name in ("oas", "ledoit-wolf"):
        np.testing.assert_allclose(merged.covariance(covariance=name).numpy(),
                                   whole.covariance(covariance=name).numpy(), rtol=1e-9, atol=1e-9)
        for p in range(x.shape[1]):
            reference, _ = (oas if name == "oas" else ledoit_wolf)(x[:15, p])
            np.testing.assert_allclose(rest.covariance(covariance=name)[p].numpy(), reference, rtol=1e-8, atol=1e-8)


def test_shrunk_factor_inverts_the_shrunk_covariance_without_epsilon():
    x = _embeddings(3)
    acc = _accumulated(x)
    mean, packed = acc.finalize(epsilon=0.5, dtype=torch.float64, keep=True, covariance="oas")
    factor = unpack_lower(packed, 8).numpy()
    for p in range(x.shape[1]):
        reference, _ = oas(x[:, p])  # epsilon (0.5 here, to be visible) is not added
        np.testing.assert_allclose(factor[p].T @ factor[p], np.linalg.inv(reference), rtol=1e-7, atol=1e-9)


def test_a_constant_position_falls_back_to_epsilon():
    x = _embeddings(4)
    x[:, 2] = 7.0  # every image the same at position 2: S = 0, its shrunk estimate is 0 too
    acc = _accumulated(x)
    for name in ("oas", "ledoit-wolf"):
        _, packed = acc.finalize(epsilon=0.01, dtype=torch.float64, keep=True, covariance=name)
        factor = unpack_lower(packed, 8).numpy()
        np.testing.assert_allclose(factor[2].T @ factor[2], np.eye(8) / 0.01, rtol=1e-9)  # (0 + 0.01 I)^-1


# ----------------------------------------------------------------------------------------- the estimator
@pytest.fixture(scope="module")
def semi(synthetic_root, tmp_path_factory):
    category = find_category(synthetic_root, "fabric", need_test=True)
    images = [s.path for s in category.test][:4]
    model = PaDiM(**FAST, n_features=12, reduction="semi-orthogonal", covariance="ledoit-wolf").fit(
        category.train, keep_statistics=True)
    folder = tmp_path_factory.mktemp("semi")
    model.save(folder / "model.safetensors")
    model.statistics_.save(folder / "stats.safetensors")
    return model, folder, images, model.predict(images).scores, category


def test_projection_and_options_survive_save_and_load(semi):
    model, folder, images, scores, _ = semi
    stored = load_file(str(folder / "model.safetensors"))  # safetensors' own reader
    assert torch.equal(stored["projection"], model.projection_.cpu())
    assert torch.equal(stored["projection"], semi_orthogonal_projection(448, 12, seed=0))  # drawn from the seed
    header = padim_header((folder / "model.safetensors").read_bytes())
    assert (header["config"]["reduction"], header["config"]["covariance"]) == ("semi-orthogonal", "ledoit-wolf")
    loaded = PaDiM.load(folder / "model.safetensors", device="cpu")
    assert torch.equal(loaded.projection_, model.projection_) and loaded.get_params()["reduction"] == "semi-orthogonal"
    np.testing.assert_array_equal(loaded.predict(images).scores, scores)


def test_statistics_keep_the_projection_and_refit_the_same_model(semi):
    model, folder, images, scores, _ = semi
    stats = FitStatistics.load(folder / "stats.safetensors")
    assert torch.equal(stats.projection, model.projection_.cpu())
    assert stats.accumulator.has_fourth_moments
    np.testing.assert_allclose(PaDiM.from_statistics(stats, device="cpu").predict(images).scores, scores, rtol=1e-6)


def test_random_and_semi_orthogonal_statistics_do_not_merge(semi, synthetic_root):
    model, folder, _, _, category = semi
    other = PaDiM(**FAST, n_features=12).fit(category.train, keep_statistics=True).statistics_
    with pytest.raises(StatisticsMismatchError, match="reduction"):
        FitStatistics.load(folder / "stats.safetensors").merge(other)


def test_partial_fit_with_the_options_equals_a_fit(semi):
    model, _, images, _, category = semi
    params = dict(**FAST, n_features=12, reduction="semi-orthogonal", covariance="oas", calibration_fraction=0)
    whole = PaDiM(**params).fit(category.train)
    parts = PaDiM(**params).partial_fit(category.train[:5]).partial_fit(category.train[5:])
    np.testing.assert_allclose(parts.predict(images).scores, whole.predict(images).scores, rtol=1e-5)


def test_statistics_without_fourth_moments_refuse_only_ledoit_wolf(semi, tmp_path):
    """Statistics files from before the fourth-moment sums load; oas works, ledoit-wolf says why not."""
    _, folder, images, _, _ = semi
    tensors = load_file(str(folder / "stats.safetensors"))
    meta = padim_header((folder / "stats.safetensors").read_bytes())
    for name in ("cubic", "quartic"):
        tensors.pop(name)
    meta.pop("checksum")
    meta.pop("layout", None)
    meta["format_version"] = 1
    old = tmp_path / "old-stats.safetensors"
    save_file(tensors, str(old), metadata={"padim": json.dumps(meta)})
    stats = FitStatistics.load(old)
    assert not stats.accumulator.has_fourth_moments
    stats.config = PadimConfig(**{**stats.config.to_dict(), "covariance": "oas"})
    stats.finalize()
    stats.config = PadimConfig(**{**stats.config.to_dict(), "covariance": "ledoit-wolf"})
    with pytest.raises(PadimError, match="fourth-moment"):
        stats.finalize()


def test_old_model_files_without_the_new_fields_load_as_random_and_fixed(tmp_path, synthetic_root):
    category = find_category(synthetic_root, "fabric", need_test=True)
    images = [s.path for s in category.test][:3]
    model = PaDiM(**FAST, n_features=8).fit(category.train)
    model.save(tmp_path / "m.safetensors")

    def forget(meta):  # a header written before the options existed
        del meta["config"]["reduction"], meta["config"]["covariance"]

    old = tmp_path / "old.safetensors"
    old.write_bytes(rewrite((tmp_path / "m.safetensors").read_bytes(), forget))
    assert "reduction" not in padim_header(old.read_bytes())["config"]
    loaded = PaDiM.load(old, device="cpu")
    assert (loaded.config_.reduction, loaded.config_.covariance, loaded.projection_) == ("random", "fixed", None)
    np.testing.assert_array_equal(loaded.predict(images).scores, model.predict(images).scores)


@pytest.mark.parametrize("edit, words", [
    (lambda t, m: t.pop("projection"), "lacks the tensor 'projection'"),
    (lambda t, m: t.update(projection=t["projection"] * 1.01), "orthonormal"),
    (lambda t, m: t.update(projection=t["projection"][:, :5].contiguous()), "projection"),
    (lambda t, m: m["config"].update(reduction="random"), "channel_idx"),
    (lambda t, m: m["config"].update(reduction="pca"), "reduction must be one of"),
    (lambda t, m: m["config"].update(covariance="shrunk"), "covariance must be one of"),
])
def test_damaged_projection_or_options_are_refused(semi, tmp_path, edit, words):
    _, folder, _, _, _ = semi
    tensors = load_file(str(folder / "model.safetensors"))
    meta = padim_header((folder / "model.safetensors").read_bytes())
    meta.pop("checksum")
    meta.pop("layout", None)
    meta["format_version"] = 1
    edit(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"padim": json.dumps(meta)})
    with pytest.raises(ModelFileError, match=words) as info:
        PaDiM.load(bad, device="cpu")
    assert "\n" not in str(info.value)


def test_a_random_model_file_with_a_projection_is_refused(tmp_path, synthetic_root):
    category = find_category(synthetic_root, "fabric", need_test=True)
    PaDiM(**FAST, n_features=8).fit(category.train).save(tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    meta = padim_header((tmp_path / "m.safetensors").read_bytes())
    meta.pop("checksum"), meta.pop("layout", None)
    meta["format_version"] = 1
    tensors["projection"] = semi_orthogonal_projection(8, 8, 0)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"padim": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="holds a projection"):
        PaDiM.load(tmp_path / "bad.safetensors", device="cpu")


def test_unknown_options_are_refused_before_any_work(capsys):
    with pytest.raises(PadimError, match="reduction"):
        PaDiM(**FAST, reduction="pca").fit(["never-read.png"] * 3)
    with pytest.raises(PadimError, match="covariance"):
        PaDiM(**FAST, covariance="shrunk").fit(["never-read.png"] * 3)
    with pytest.raises(SystemExit):
        main(["fit", "--data-root", "d", "--category", "c", "--output", "m", "--reduction", "pca"])
    assert "invalid choice" in capsys.readouterr().err


def test_exported_graph_projects_like_the_model(semi):
    """What export traces (the scorer in tracing mode: plain operations, the projection summed layer by
    layer without output buffers) equals predict's eager path (buffers, CPU chunks) with a projection."""
    from padim.files.images import load_pixels

    model, _, images, scores, _ = semi
    pixels = torch.from_numpy(np.stack([load_pixels(path, model.config_)[0] for path in images]))
    with torch.inference_mode(), model.scorer_.tracing():
        maps, graph_scores = model.scorer_(pixels)
    np.testing.assert_allclose(graph_scores.numpy(), scores, rtol=1e-4)


# ----------------------------------------------------------------------------------------- the CLI and the benchmark
def test_cli_fit_with_both_options(synthetic_root, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["fit", "--data-root", str(synthetic_root), "--category", "fabric", "--weights", "random",
                 "--image-size", "64", "--n-features", "8", "--device", "cpu", "--reduction", "semi-orthogonal",
                 "--covariance", "oas", "--output", str(out)]) == 0
    assert "semi-orthogonal reduction, oas covariance" in capsys.readouterr().out
    loaded = PaDiM.load(out, device="cpu")
    assert (loaded.config_.reduction, loaded.config_.covariance) == ("semi-orthogonal", "oas")


def test_accuracy_benchmark_grid_verify_costs_and_report_on_a_tiny_setting(synthetic_root, tmp_path, capsys):
    """The script's commands through its main() in this process (a process each would spend most of the
    test importing torch; the thread count --threads sets is put back after each); ``costs`` still times
    real padim fit and padim test processes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_benchmark", REPO / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    tiny = ["--data-root", str(synthetic_root), "--backbone", "resnet18", "--weights", "random", "--image-size", "64",
            "--threads", "1", "--cache", str(tmp_path / "cache")]
    results, costs = tmp_path / "grid.json", tmp_path / "costs.json"
    threads = torch.get_num_threads()

    def run(*args):
        capsys.readouterr()
        try:
            accuracy.main(list(args))
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out

    run("grid", *tiny, "--datasets", "fabric", "--d", "6", "--seeds", "0,1", "--results", str(results))
    cells = json.loads(results.read_text())["cells"]
    assert len(cells) == 2 * 3 * 2 and all(0 <= c["image_AUROC"] <= 1 for c in cells.values())
    verified = json.loads(run("verify", *tiny, "--dataset", "fabric", "--d", "6", "--seed", "1"))
    assert verified["max_relative_score_difference"] < 1e-4  # the grid computes what PaDiM computes
    assert verified["grid_pixel_AUPRO"] == pytest.approx(verified["padim_pixel_AUPRO"], abs=1e-6)
    run("costs", *tiny, "--category", "fabric", "--reductions", "semi-orthogonal", "--covariances", "oas",
        "--d", "6", "--repeats", "1", "--results", str(costs))
    row = next(iter(json.loads(costs.read_text())["costs"].values()))
    assert row["fit_s"] > 0 and row["test_ms_per_image"] > 0 and row["model_MB"] > 0
    report = run("report", "--results", str(results), "--costs", str(costs))
    assert "| semi-orthogonal | oas | 6 |" in report and "Differences of the means from random + fixed" in report
    assert "| semi-orthogonal + oas | 6 |" in report  # the rule's verdict for each option
