"""Every option is checked before any work: one line, exit 1, well under a second, no image read."""

import os
import time

import pytest
import torch

import padim.files.images
import padim.core.estimator
from padim.settings import options as checks
from padim.files import outputs
from padim.core.backbones import BACKBONES, get_spec
from padim.cli import main
from padim.errors import PadimError

from conftest import FAST

FIT = ["fit", "--category", "fabric", "--weights", "random", "--image-size", "64", "--device", "cpu"]


@pytest.fixture
def no_image_reads(monkeypatch):
    """Any image decode fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(padim.files.images, "load_pixels", refuse)


def _refused(capsys, argv, *words):
    started = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"padim {argv[0]}: error: ")
    for word in words:
        assert word in err[0], err[0]
    assert elapsed < 1.0, elapsed
    return err[0]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_stage_table_matches_the_real_networks(backbone, size):
    """The table behind every check, against the networks' own output shapes (meta device: no memory)."""
    spec = get_spec(backbone)
    with torch.device("meta"):
        x = torch.empty(1, 3, *size)
        for name, stage in spec.stages(spec.build()):
            x = stage(x)
            layout = checks.feature_layout(backbone, [name], size)
            assert (layout.channels, layout.grid) == (x.shape[1], tuple(x.shape[2:])), name


def test_default_layers_channels():
    assert checks.feature_layout("resnet18", ("layer1", "layer2", "layer3"), (256, 256)).channels == 64 + 128 + 256
    assert checks.feature_layout("wide_resnet50_2", ("layer1", "layer2", "layer3"), (224, 224)) [:2] == (1792, (56, 56))


@pytest.mark.parametrize("d", ["0", "449", "-3"])
def test_n_features_outside_the_layers_channels(synthetic_root, tmp_path, capsys, no_image_reads, d):
    _refused(capsys, FIT + ["--n-features", d, "--data-root", str(synthetic_root), "--output", str(tmp_path / "m")],
             "--n-features must be 1 to 448", f"got {d}")
    assert not (tmp_path / "m").exists()


def test_n_features_zero_in_the_library_is_not_the_default(synthetic_root, no_image_reads):
    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    with pytest.raises(PadimError, match="`n_features` must be 1 to 448"):
        padim.core.estimator.PaDiM(**FAST, n_features=0).fit(train)


@pytest.fixture(scope="module")
def model_file(synthetic_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "fabric.safetensors"
    assert main(FIT + ["--n-features", "8", "--data-root", str(synthetic_root), "--output", str(path)]) == 0
    return path


@pytest.mark.parametrize("command", ["fit", "test", "predict", "benchmark"])
@pytest.mark.parametrize("batch", ["0", "-1"])
def test_batch_size_below_one_on_every_command(synthetic_root, model_file, tmp_path, capsys, no_image_reads,
                                               command, batch):
    capsys.readouterr()
    root, out = str(synthetic_root), str(tmp_path / "out")
    argv = {
        "fit": FIT + ["--data-root", root, "--output", out],
        "test": ["test", "--model", str(model_file), "--data-root", root, "--category", "fabric", "--output", out],
        "predict": ["predict", "--model", str(model_file), str(synthetic_root / "fabric" / "test" / "good")],
        "benchmark": ["benchmark", "--data-root", root, "--categories", "fabric", "--weights", "random",
                      "--image-size", "64", "--output", out],
    }[command]
    _refused(capsys, argv + ["--batch-size", batch, "--device", "cpu"], "--batch-size", f"got {batch}")


def test_library_load_refuses_batch_size_zero(model_file):
    with pytest.raises(PadimError, match="`batch_size`"):
        padim.core.estimator.PaDiM.load(model_file, device="cpu", batch_size=0)


@pytest.mark.parametrize("seed, ok", [(2 ** 64, False), (-(2 ** 63) - 1, False), (2 ** 64 - 1, True), (-(2 ** 63), True)])
def test_seed_range_is_the_one_torch_accepts(seed, ok):
    def torch_accepts(value):
        try:
            torch.Generator().manual_seed(value)
            return True
        except (RuntimeError, ValueError, OverflowError):
            return False

    assert torch_accepts(seed) == ok  # the reference
    if ok:
        checks.check_seed(seed)
    else:
        with pytest.raises(PadimError, match="`seed`"):
            checks.check_seed(seed)


def test_seed_out_of_range_on_the_command_line(synthetic_root, tmp_path, capsys, no_image_reads):
    _refused(capsys, FIT + ["--seed", str(2 ** 64), "--data-root", str(synthetic_root), "--output", str(tmp_path / "m")],
             "--seed")


def test_memory_estimate_known_answer():
    """resnet18, 256 x 256, d = 100: P = 64 * 64, sums 8 bytes and factor 4 bytes per triangle entry."""
    layout = checks.feature_layout("resnet18", ("layer1", "layer2", "layer3"), (256, 256))
    estimate = checks.fit_memory_estimate(layout, 100, (256, 256), batch_size=32, device="cpu")
    statistics = 4096 * 5050 * 12
    assert statistics < estimate < statistics * 1.5


def test_fit_that_cannot_fit_in_memory_is_refused_with_estimate_and_suggestion(synthetic_root, tmp_path, capsys,
                                                                               no_image_reads, monkeypatch):
    monkeypatch.setattr(checks, "available_memory", lambda device: 50 << 20)  # 50 MB free
    line = _refused(capsys, ["fit", "--category", "fabric", "--weights", "random", "--image-size", "512",
                             "--device", "cpu", "--data-root", str(synthetic_root), "--output", str(tmp_path / "m")],
                    "needs at least", "--image-size (e.g.")
    suggested = int(line.split("--image-size (e.g. ")[1].split(")")[0])
    layout = checks.feature_layout("resnet18", ("layer1", "layer2", "layer3"), (suggested, suggested))
    assert checks.fit_memory_estimate(layout, 100, (suggested, suggested), 32, "cpu") <= 50 << 20


def test_available_memory_reads_the_machine():
    free = checks.available_memory("cpu")
    assert free is None or 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("case", ["folder_for_file", "under_a_file", "proc", "sys"])
def test_fit_output_that_cannot_be_written(synthetic_root, tmp_path, capsys, no_image_reads, case):
    (tmp_path / "plain").write_text("x")
    output = {"folder_for_file": tmp_path, "under_a_file": tmp_path / "plain" / "m.safetensors",
              "proc": "/proc/padim-test/m.safetensors", "sys": "/sys/m.safetensors"}[case]
    _refused(capsys, FIT + ["--data-root", str(synthetic_root), "--output", str(output)], str(output))


@pytest.mark.parametrize("command", ["test", "benchmark", "predict", "demo"])
def test_output_folder_that_is_a_file(synthetic_root, model_file, tmp_path, capsys, no_image_reads, command):
    output = tmp_path / "a-file"
    output.write_text("x")
    argv = {
        "test": ["test", "--model", str(model_file), "--data-root", str(synthetic_root), "--category", "fabric"],
        "benchmark": ["benchmark", "--data-root", str(synthetic_root), "--weights", "random", "--categories", "fabric"],
        "predict": ["predict", "--model", str(model_file), str(synthetic_root / "fabric" / "test" / "good")],
        "demo": ["demo"],
    }[command]
    _refused(capsys, argv + ["--output", str(output)], "is a file; give a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(synthetic_root, tmp_path, capsys, no_image_reads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(capsys, FIT + ["--data-root", str(synthetic_root), "--output", str(locked / "m.safetensors")],
                 "not writable")
    finally:
        locked.chmod(0o755)


def test_read_only_file_system_is_refused(tmp_path, monkeypatch):
    """os.access reports EROFS even for root; simulated here, as a test cannot mount one."""
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real(path, mode))
    with pytest.raises(PadimError, match="not writable"):
        outputs.check_output_file(tmp_path / "m.safetensors")


@pytest.mark.parametrize("sigma, epsilon, words", [(0.0, 0.01, "sigma"), (-1.0, 0.01, "sigma"), (40.0, 0.01, "blurs over"),
                                                   (4.0, -1.0, "epsilon"), (4.0, float("nan"), "epsilon")])
def test_sigma_and_epsilon_are_checked_before_any_work(no_image_reads, sigma, epsilon, words):
    with pytest.raises(PadimError, match=words):
        padim.core.estimator.PaDiM(**{**FAST, "sigma": sigma, "epsilon": epsilon}).fit(["never-read.png"] * 3)


def test_layers_named_twice_are_refused(synthetic_root, capsys, no_image_reads):
    _refused(capsys, [*FIT, "--data-root", str(synthetic_root), "--layers", "layer1,layer1", "--output", "m.st"], "twice")
