"""argparse with one-line mistakes and a public list of what each command takes."""

from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr and exit status 1 with a pointer to ``--help``
    (argparse prints its whole usage and exits 2)."""

    def __init__(self, *args, **kwargs):
        self.options = []  # every argument this parser takes, in order (the flags' names, the docs' test)
        self.commands = {}  # name -> the parser of each subcommand
        super().__init__(*args, **kwargs)  # adds --help

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices
        return action

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(1)
