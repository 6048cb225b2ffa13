"""Says so when the event loop is held up by code that blocks it: a plugin's `time.sleep`, a socket call with
no timeout, a lock another thread holds. Every webhook and every delivery waits meanwhile, and nothing else
would say why, nor where. A thread of its own watches a beat the loop keeps, and names the code the loop's
thread is running once the beat is late: nothing is added to what the loop does per webhook."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import selectors
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from types import CodeType, FrameType
from typing import TYPE_CHECKING

from gateway.logs import Throttle

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger("hookyard.loop")

# How long the loop may go without running its beat before it is said to be blocked. Far past any callback
# of the gateway's own (a webhook's takes tens of microseconds), and short of what a sender would time out on.
STALL_THRESHOLD = 1.0  # seconds
# How often the loop beats, and the watching thread looks.
BEAT_INTERVAL = 0.25  # seconds
# The same blocking code (a provider's verify, on every webhook) is named at most once a minute.
_LOG_INTERVAL = 60.0  # seconds

_PATHS = sysconfig.get_paths()
_STDLIB = tuple({_PATHS["stdlib"], _PATHS["platstdlib"]})
# Installed packages, plugins among them, may lie under the standard library's directory.
_INSTALLED = tuple({_PATHS["purelib"], _PATHS["platlib"]})
# Where asyncio's own loop waits for something to do: in its selector, called from the loop's turn.
_SELECTORS = selectors.__file__
_RUN_ONCE = asyncio.base_events.BaseEventLoop._run_once.__code__  # type: ignore[attr-defined]
# How many frames of a blocked stack are logged.
_STACK_FRAMES = 8


class StallWatch:
    """Started and stopped on the loop's own thread. plugins: each plugin's source, a module's file or a
    package's directory (plugin_sources), and the plugin's name: the code to name before any other."""

    def __init__(self, loop: asyncio.AbstractEventLoop, plugins: Mapping[str, str] | None = None) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hookyard-stall-watch", daemon=True)
        self._throttle = Throttle(_LOG_INTERVAL)
        self._plugins = tuple((plugins or {}).items())
        # The frame that runs the loop, where a loop in C (uvloop's) waits for something to do: (its code, its
        # depth) once started.
        self._runner: tuple[CodeType, int] | None = None

    def start(self) -> None:
        self._runner = _runner(sys._getframe())
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        self._handle = self._loop.call_later(BEAT_INTERVAL, self._tick)

    def _idle(self, frame: FrameType) -> bool:
        """Whether the loop's thread waits for something to do: in the selector's select (asyncio's loop), or
        in the frame that runs a loop written in C."""
        if frame.f_code.co_filename == _SELECTORS:
            # The loop's own wait, not a plugin's blocking call that waits in a selector too (subprocess.run
            # with its output captured, multiprocessing's wait).
            return frame.f_back is not None and frame.f_back.f_code is _RUN_ONCE
        if self._runner is None or frame.f_code is not self._runner[0]:
            return False
        return _depth(frame) == self._runner[1]

    def _watch(self) -> None:
        told = None  # the beat of the stall said already: once per stall
        while not self._stopped.wait(BEAT_INTERVAL):
            beat = self._beat
            blocked = time.monotonic() - beat
            if blocked < STALL_THRESHOLD or beat == told:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            idle = self._idle(frame)
            stack = traceback.extract_stack(frame)
            del frame
            if idle or self._beat != beat:
                # The loop was only late to run (the process paused, say: SIGSTOP, a VM suspended), and
                # runs again: nothing blocks it.
                continue
            told = beat
            self._report(blocked, stack)

    def _report(self, blocked: float, stack: traceback.StackSummary) -> None:
        at, plugin = self._culprit(stack)
        culprit = stack[at]
        suppressed = self._throttle.admit(culprit.filename, str(culprit.lineno))
        if suppressed is None:
            return
        where = f"{culprit.name} ({culprit.filename}:{culprit.lineno})"
        inward = stack[at:]
        if len(inward) > _STACK_FRAMES:  # the culprit's own frames, and the innermost, where it waits
            inward = inward[: _STACK_FRAMES // 2] + inward[-(_STACK_FRAMES // 2) :]
        extra = {
            "blocked_s": round(blocked, 1),
            "function": culprit.name,
            "file": culprit.filename,
            "line": culprit.lineno,
            "plugin": plugin,
            "stack": "".join(traceback.format_list(inward)),
            "suppressed": suppressed,
        }
        if plugin is not None:
            log.warning(
                "the event loop has been blocked for %s s, in %s of plugin %s: every webhook and delivery "
                "waits for it; a plugin must not block (await, or run it with asyncio.to_thread)",
                f"{blocked:.1f}",
                where,
                plugin,
                extra=extra,
            )
        else:
            log.warning(
                "the event loop has been blocked for %s s, in %s: every webhook and delivery waits for it",
                f"{blocked:.1f}",
                where,
                extra=extra,
            )

    def _culprit(self, stack: traceback.StackSummary) -> tuple[int, str | None]:
        """The index in stack of the code to name, and its plugin: the innermost frame of a plugin's (its
        verify, not the HTTP client it calls); else the innermost outside the standard library and installed
        libraries (Hookyard's own); else the innermost."""
        for at in range(len(stack) - 1, -1, -1):
            filename = stack[at].filename
            for source, plugin in self._plugins:
                if filename == source or filename.startswith(source + os.sep):
                    return at, plugin
        for at in range(len(stack) - 1, -1, -1):
            filename = stack[at].filename
            if not filename.startswith(_STDLIB) and not filename.startswith(_INSTALLED):
                return at, None
        return len(stack) - 1, None


def plugin_sources(pm: pluggy.PluginManager, classes: Iterable[type]) -> dict[str, str]:
    """Each plugin's source (a module's file, or a package's directory) and the plugin's name: the plugins
    pm holds, and the modules of the classes they registered (providers, actions)."""
    from gateway.plugins import plugin_of

    modules: dict[str, str] = {}
    for name, plugin in pm.list_name_plugin():
        modules.setdefault(plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__, name)
    for cls in classes:
        modules.setdefault(cls.__module__, plugin_of(pm, cls))
    sources: dict[str, str] = {}
    for module_name, plugin in modules.items():
        if module_name == "gateway" or module_name.startswith("gateway."):
            continue  # Hookyard's own
        module = sys.modules.get(module_name)
        path = getattr(module, "__path__", None)
        if path:  # a package: every module in it
            for directory in path:
                sources.setdefault(directory, plugin)
        else:
            file = getattr(module, "__file__", None)
            if isinstance(file, str):
                sources.setdefault(file, plugin)
    return sources


def _runner(frame: FrameType | None) -> tuple[CodeType, int] | None:
    """The frame that runs the loop, below the outermost coroutine's (the coroutine that starts the watch):
    with a loop written in C, nothing of the loop's is between them. None under asyncio's own loop, whose
    frames are Python's and wait in the selector."""
    runner = None
    while frame is not None:
        if frame.f_code.co_flags & inspect.CO_COROUTINE:
            runner = frame.f_back
        frame = frame.f_back
    if runner is None or runner.f_code is asyncio.Handle._run.__code__:
        return None
    return runner.f_code, _depth(runner)


def _depth(frame: FrameType | None) -> int:
    depth = 0
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth
