"""The ``padim`` command: parse, call the library, print. User errors end in one line and exit 1."""

from __future__ import annotations

import re
import sys
from typing import List, Optional

from padim.cli.checks import check_args
from padim.cli.commands import cmd_benchmark, cmd_demo, cmd_download, cmd_export, cmd_fit, cmd_serve, cmd_test, cmd_update
from padim.cli.commands import cmd_recalibrate
from padim.cli.parser import BACKBONE_NAMES, ENGINE_NAMES, PRECISION_NAMES, TORCH_STACK, build_parser  # noqa: F401
from padim.cli.predict import cmd_predict
from padim.errors import PadimError

COMMANDS = {"fit": cmd_fit, "update": cmd_update, "recalibrate": cmd_recalibrate, "test": cmd_test, "predict": cmd_predict, "benchmark": cmd_benchmark,
            "download": cmd_download, "demo": cmd_demo, "export": cmd_export, "serve": cmd_serve}


def as_flags(message: str, parser) -> str:
    """The library names parameters in backticks (`n_features`); the command shows its own flags
    (--n-features): the one place parameter names become flags."""
    flags = {}
    for command in parser.commands.values():
        for option in command.options:
            long = [flag for flag in option.option_strings if flag.startswith("--")]
            if long:
                flags.setdefault(option.dest, long[0])
    return re.sub(r"`(\w+)`", lambda found: flags.get(found.group(1), found.group(1)), message)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        status = COMMANDS[args.command](args)
    except PadimError as exc:
        print(f"padim {args.command}: error: {as_flags(str(exc), parser)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in TORCH_STACK:
            raise
        hint = ("pip install matplotlib" if exc.name == "matplotlib" else
                "pip install padim-inspect (without torch only 'padim predict --engine onnxruntime|openvino --export DIR', "
                "without --output, runs)")
        print(f"padim {args.command}: error: this needs {exc.name}, which is not installed: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"padim {args.command}: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
