"""Says so when the event loop is held up by code that blocks it: a plugin's `time.sleep`, a socket call with
no timeout, a lock another thread holds. Every webhook and every delivery waits meanwhile, and nothing else
would say why, nor where. A thread of its own watches a beat the loop keeps, and names the code the loop's
thread is running once the beat is late: nothing is added to what the loop does per webhook."""

from __future__ import annotations

import asyncio
import logging
import sys
import sysconfig
import threading
import time
import traceback

from gateway.logs import Throttle

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


class StallWatch:
    """Started and stopped on the loop's own thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hookyard-stall-watch", daemon=True)
        self._throttle = Throttle(_LOG_INTERVAL)

    def start(self) -> None:
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        self._handle = self._loop.call_later(BEAT_INTERVAL, self._tick)

    def _watch(self) -> None:
        told = None  # the beat of the stall said already: once per stall
        while not self._stopped.wait(BEAT_INTERVAL):
            beat = self._beat
            blocked = time.monotonic() - beat
            if blocked < STALL_THRESHOLD or beat == told:
                continue
            told = beat
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            stack = traceback.extract_stack(frame)
            del frame
            culprit = _culprit(stack)
            where = f"{culprit.name} ({culprit.filename}:{culprit.lineno})"
            suppressed = self._throttle.admit(culprit.filename, str(culprit.lineno))
            if suppressed is None:
                continue
            log.warning(
                "the event loop has been blocked for %s s, in %s: every webhook and delivery waits for it; "
                "a plugin must not block (await, or run it with asyncio.to_thread)",
                f"{blocked:.1f}",
                where,
                extra={
                    "blocked_s": round(blocked, 1),
                    "function": culprit.name,
                    "file": culprit.filename,
                    "line": culprit.lineno,
                    "stack": "".join(traceback.format_list(stack[-8:])),
                    "suppressed": suppressed,
                },
            )


def _culprit(stack: traceback.StackSummary) -> traceback.FrameSummary:
    """The innermost frame outside the standard library (the plugin's verify, not socket.py's recv)."""
    for frame in reversed(stack):
        if not frame.filename.startswith(_STDLIB) or frame.filename.startswith(_INSTALLED):
            return frame
    return stack[-1]
