"""The `hookyard` command's entry point: catches a SIGTERM that comes while the command is still importing.

Importing the gateway takes about half a second. Until `hookyard serve` installs its own signal handlers, a
SIGTERM left at its default disposition would be lost for PID 1 in a container (the kernel ignores it), so a
pod deleted while it starts would wait out its whole grace period before SIGKILL. This module imports
nothing heavy: the handler is in place a few milliseconds after the interpreter starts, and the gateway
reads what it caught once its own handlers are installed (see `Gateway.serve`).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_caught: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _caught.append(signum)


def catch_early_sigterm() -> None:
    """Remember a SIGTERM instead of dying of it (or, as PID 1, ignoring it) until the gateway takes over."""
    signal.signal(signal.SIGTERM, _remember)


def sigterm_caught() -> bool:
    """Whether a SIGTERM came before the gateway installed its own handlers."""
    return bool(_caught)


def main() -> None:
    # Only `serve` runs until a signal: the other commands keep SIGTERM's default (it ends them at once).
    if sys.argv[1:2] == ["serve"]:
        catch_early_sigterm()
    from gateway.cli import main as cli

    cli()
