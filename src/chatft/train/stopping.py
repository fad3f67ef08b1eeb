"""A graceful stop: SIGTERM or SIGINT finishes the current optimizer step, saves it, and exits.

Clusters send SIGTERM before they kill a job (preemption); a user presses Ctrl-C. Either way
the run should lose nothing. :class:`StopSignals` is installed around the training loop on
every process: the first signal only records itself; the loop adds the flag to the step's
loss all-reduce, so all processes learn of it at the same step (one signalled process is
enough), save that step's checkpoint and raise :class:`Stopped`, whose exit code is the
usual ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).

A second signal aborts at once, without saving (the signal's default action). Copies of the
first one that arrive within :data:`DEBOUNCE_S` do not count as a second: Ctrl-C reaches every
process of the terminal's process group, and DeepSpeed's launcher forwards a SIGTERM of its own
right after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

from chatft.errors import ChatftError

#: Seconds after the first signal during which further signals count as copies of it.
DEBOUNCE_S = 1.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(ChatftError):
    """Training stopped on a signal, after saving (or saying why it could not save)."""

    every_rank = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT request a stop instead of killing."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only there can it install
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            if self.rank == 0:
                print(f"\nchatft: {signal.Signals(signum).name} received: finishing this step, "
                      f"then saving a checkpoint (send it again to abort at once)",
                      file=sys.stderr, flush=True)
        elif now - self._first_at > DEBOUNCE_S:
            print(f"chatft: second signal ({signal.Signals(signum).name}): aborting now, "
                  f"without saving", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
