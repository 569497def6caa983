"""What padim knows of each backbone without building it (torch-free): its name, the stages it is cut
into with their channels and strides, the paper's feature layers and number of kept channels.

One table: ``padim.core.backbones`` builds the networks from these names and defaults, the options
and a model file's checks count channels and grids from it, and the command line offers its names.
``tests/test_features.py`` checks the channels and strides against the real networks.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

from padim.errors import PadimError

# [(stage, output channels, stride as a number of halvings)]; every halving is ceil(n / 2).
_RESNET_BASIC = [("stem", 64, 2), ("layer1", 64, 2), ("layer2", 128, 3), ("layer3", 256, 4), ("layer4", 512, 5)]
_RESNET_BOTTLENECK = [("stem", 64, 2), ("layer1", 256, 2), ("layer2", 512, 3), ("layer3", 1024, 4), ("layer4", 2048, 5)]
_RESNET_LAYERS = ("layer1", "layer2", "layer3")


class BackboneEntry(NamedTuple):
    stages: List[Tuple[str, int, int]]
    default_layers: Tuple[str, ...]  # the paper's choice: strides 4, 8, 16
    default_d: int  # the paper's number of kept channels


TABLE: Dict[str, BackboneEntry] = {
    "resnet18": BackboneEntry(_RESNET_BASIC, _RESNET_LAYERS, 100),
    "resnet50": BackboneEntry(_RESNET_BOTTLENECK, _RESNET_LAYERS, 550),
    "wide_resnet50_2": BackboneEntry(_RESNET_BOTTLENECK, _RESNET_LAYERS, 550),
    "efficientnet_lite0": BackboneEntry(
        [("stem", 32, 1), ("blocks.0", 16, 1), ("blocks.1", 24, 2), ("blocks.2", 40, 3), ("blocks.3", 80, 4),
         ("blocks.4", 112, 4), ("blocks.5", 192, 5), ("blocks.6", 320, 5)],
        ("blocks.1", "blocks.2", "blocks.4"), 100),
}
BACKBONE_NAMES = tuple(sorted(TABLE))


def entry(name: str) -> BackboneEntry:
    """The table's row for ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in TABLE:
        raise PadimError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    return TABLE[name]


def is_weights_file(weights: str) -> bool:
    """Whether a ``weights`` setting names a file (anything but "imagenet" and "random")."""
    return str(weights) not in ("imagenet", "random")
