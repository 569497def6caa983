"""What the command line's option values are: sizes (N or HxW) and tiles (S or auto), as argparse
types whose mistakes are one line (``padim.cli.one_line_parser``)."""

from __future__ import annotations

import argparse


def tile_value(text: str):
    """'auto' or a whole number of pixels."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or auto, got {text!r}") from None


def size_value(text: str):
    """'256' -> 256, '256x320' -> (256, 320) (height x width)."""
    try:
        if "x" in text.lower():
            height, width = text.lower().split("x")
            return (int(height), int(width))
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
