"""Subcommands of the ``ptq`` CLI, one module each.

A module here defines ``register(subparsers)``: it adds its parser (with a description, examples and every option
documented) and calls ``set_defaults(func=run)``, where ``run(args) -> int`` returns the exit code. ``ptq/cli.py``
finds the modules with pkgutil, so adding a command means adding a module. Import heavy dependencies (torch,
transformers) inside ``run`` so ``ptq --help`` stays fast.
"""

import argparse
import textwrap


def add_parser(subparsers, name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand parser with the house style: a description, then examples kept as written."""
    description = "\n\n".join(textwrap.fill(par, 100) for par in description.split("\n\n"))
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
