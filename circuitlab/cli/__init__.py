"""The ``circuitlab`` command line: one module per command group, each registering its flags
next to its handler; shared flags and validators in ``_common``.

    circuitlab models
    circuitlab layers  --model efficientnet_lite0 [--kind conv] [--json]
    circuitlab predict --model efficientnet_lite0 --image coffee [--topk 5] [--json]
    circuitlab explain --model efficientnet_lite0 --image coffee --out runs/coffee
    circuitlab train-explainer --model synthetic-cnn --data synthetic --out explainer.pt
    circuitlab explain --model synthetic-cnn --image synthetic:0 --out runs/s0 \\
        --mode amortized --explainer explainer.pt
    circuitlab saliency --model efficientnet_lite0 --image coffee --method gradcam --out runs/gc
    circuitlab circuit --model efficientnet_lite0 --image coffee --out runs/circuit \\
        [--faithfulness 0.8 | --select energy --k 16] [--explain]
    circuitlab ablate --model efficientnet_lite0 --image coffee --layer blocks.4 --out a.csv
    circuitlab patch --model efficientnet_lite0 --image coffee --explanation runs/coffee \\
        --layer blocks.6 --out p.csv
    circuitlab report --out runs/report [--from analyses/out | --run [--quick]]

Bad input gives one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from typing import Optional, Sequence

from ..errors import CircuitlabError
from . import circuit, explain, models, report, saliency, train, units

GROUPS = (models, explain, train, circuit, units, saliency, report)   # the order of `--help`


class _UsageError(Exception):
    """A flag argparse refused; main() prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line ("--steps must be at least 1, got 0"), not a
    usage block; --help is unchanged."""

    def error(self, message: str):
        m = re.match(r"argument (-[\w-]+)(?:/-[\w-]+)*: (.*)", message, flags=re.S)
        if m:
            message = f"{m.group(1)} {m.group(2)}" if not m.group(2).startswith("invalid") \
                else f"{m.group(1)}: {m.group(2)}"
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(prog="circuitlab", description="Minimal explanations and circuits for "
                                                    "image classifiers (CNNs and ViTs).")
    parser.add_argument("--version", action="version", version=f"circuitlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler pre-empting the job, torchrun stopping its workers), raised where
    the command is so that it ends as an interrupt does: outputs whole or absent, a folder
    run's table written, the lock released."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises ``_Terminated`` inside the block (the main thread only: elsewhere the
    signal module cannot set a handler); the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the CLI's other messages are: one line, no source excerpt."""
    print(f"circuitlab: warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"circuitlab: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings(), _terminate_as_interrupt():
            warnings.showwarning = _one_line
            return args.func(args)
    except CircuitlabError as e:
        if args.debug:
            raise
        print(f"circuitlab: error: {e}", file=sys.stderr)
        return 2
    except _Terminated:
        print("circuitlab: terminated (SIGTERM); rerun the same command to resume",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("circuitlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `circuitlab ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"circuitlab: internal error: {type(e).__name__}: {e} (rerun with --debug for "
              f"the traceback, and please report it)", file=sys.stderr)
        return 1
