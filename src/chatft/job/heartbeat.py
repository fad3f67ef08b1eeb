"""Who is still alive: heartbeats through the rendezvous store, so no process waits in silence.

A collective operation cannot say which process it waits for: gloo fails at once with
"connection closed by peer", NCCL waits until its timeout and then aborts the process. So every
training process runs a small thread that, through its own connection to the rendezvous store
(the TCP store at MASTER_ADDR:MASTER_PORT that torch.distributed joined through):

* beats: increments ``beat/RANK`` every ``period`` seconds (the thread runs while the main
  thread is blocked inside a collective, so a live process keeps beating);
* on rank 0, watches: a rank whose counter has not moved for ``dead_after`` seconds (half of
  ``--ddp_timeout``; a few periods once a collective has already failed) is declared dead, and
  the verdict, naming its rank, node, host and PID, is posted as ``abort``;
* on every rank, listens: once ``abort`` is posted (by rank 0's watch, or by a process that
  failed with an error and said why), the process prints it and stops; a store that stays
  unreachable for ``dead_after`` means rank 0 (which hosts it) or node 0 is gone.

The main thread stops too: a process whose collective failed waits for the verdict and raises
it as a :class:`~chatft.errors.DistributedError`; a process stuck inside a collective is ended
by the thread (``os._exit``), as nothing else can interrupt it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

from chatft.errors import ChatftError, DistributedError
from chatft.job.cluster import Placement

#: Exit code of a process stopped because another one died or failed.
PEER_FAILED_EXIT = 3


def periods(timeout_s: float) -> tuple[float, float, float]:
    """``(beat period, dead after, dead after once a collective failed)`` in seconds for a
    ``--ddp_timeout`` of ``timeout_s``: a process silent for half the timeout is dead; after
    a failed collective, three missed beats suffice."""
    period = min(5.0, max(0.5, timeout_s / 20))
    return period, max(3 * period, timeout_s / 2), 3 * period + 1


class Heartbeat:
    """The beat/watch/listen thread of one training process (see the module docstring)."""

    def __init__(self, place: Placement, timeout_s: float):
        import torch.distributed as dist

        self.place = place
        self.period, self.dead_after, self.dead_after_failure = periods(timeout_s)
        self._store = dist.PrefixStore(
            "chatft-heartbeat/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
            dist.TCPStore(place.master_addr, place.master_port, is_master=False,
                          timeout=timedelta(seconds=max(2 * self.period, 10)),
                          wait_for_workers=False))
        self._store.set(f"who/{place.rank}", json.dumps({"where": place.where(),
                                                          "pid": os.getpid()}))
        self._stop = threading.Event()
        self._verdict: str | None = None
        self._decided = threading.Event()
        self.main_failed = False  # the main thread is handling an error: it reports, not us
        self._thread = threading.Thread(target=self._run, name="chatft-heartbeat", daemon=True)

    # ------------------------------------------------------------------ main thread's side

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        """This process is done (training and export finished): no longer watched."""
        self._stop.set()
        self._thread.join(timeout=2 * self.period + 5)
        try:
            self._store.set(f"done/{self.place.rank}", "1")
        except Exception:  # noqa: BLE001 - rank 0 (the store) may have exited already
            pass

    def report_failure(self, message: str) -> None:
        """Post why this process stops, so the others stop at once with that reason."""
        self.main_failed = True  # this process reports its own error; the thread must not
        try:
            if not self._store.check(["abort"]):
                self._store.set("abort", f"{self.place.where()} failed: {message}")
        except Exception:  # noqa: BLE001 - the store is gone: the others find out by themselves
            pass

    def verdict_after_failure(self) -> str | None:
        """After a collective failed in the main thread: wait until a dead or failed process is
        named (by this thread or another process), at most ``dead_after_failure`` plus a
        few beats; None when every process still looks alive."""
        self.main_failed = True
        self._decided.wait(self.dead_after_failure + 3 * self.period)
        return self._verdict

    # ------------------------------------------------------------------ the thread

    def _who(self, rank: int) -> str:
        try:
            who = json.loads(self._store.get(f"who/{rank}"))
            return f"{who['where']}, PID {who['pid']}"
        except Exception:  # noqa: BLE001
            return f"rank {rank}"

    def _decide(self, verdict: str) -> None:
        self._verdict = verdict
        self._decided.set()
        if not self.main_failed:
            # The main thread is running or stuck in a collective: only this thread can stop
            # the process. (A main thread handling an error raises the verdict itself.)
            print(f"chatft: error: {self.place.where()}: stopping: {verdict}", file=sys.stderr,
                  flush=True)
            os._exit(PEER_FAILED_EXIT)

    def _run(self) -> None:
        rank, world = self.place.rank, self.place.world_size
        beat = f"beat/{rank}"
        last_seen: dict[int, tuple[int, float]] = {}
        store_lost_since: float | None = None
        while not self._stop.wait(self.period):
            now = time.monotonic()
            try:
                self._store.add(beat, 1)
                if self._store.check(["abort"]):
                    self._decide(self._store.get("abort").decode())
                    return
                if rank == 0:
                    limit = self.dead_after_failure if self.main_failed else self.dead_after
                    for r in range(1, world):
                        count = self._store.add(f"beat/{r}", 0)
                        prev = last_seen.get(r)
                        if prev is None or prev[0] != count:
                            last_seen[r] = (count, now)
                        elif (now - prev[1] > limit
                              and not self._store.check([f"done/{r}"])):
                            verdict = (f"{self._who(r)} stopped responding: no heartbeat for "
                                       f"{now - prev[1]:.0f} s (the process died, was killed, "
                                       "or its node is unreachable)")
                            self._store.set("abort", verdict)
                            self._decide(verdict)
                            return
                store_lost_since = None
            except Exception as e:  # noqa: BLE001 - a store error is the signal here
                store_lost_since = store_lost_since or now
                limit = self.dead_after_failure if self.main_failed else self.dead_after
                if now - store_lost_since > limit:
                    self._decide(f"lost contact with rank 0 (node 0), which hosts the "
                                 f"rendezvous at {self.place.master_addr}:{self.place.master_port}, "
                                 f"for {now - store_lost_since:.0f} s ({type(e).__name__}): rank "
                                 "0 died or node 0 is unreachable")
                    return


def _is_distributed_failure(error: BaseException) -> bool:
    """Errors of a collective whose peer went away (gloo, NCCL, the store)."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, (dist.DistError, ConnectionError)) or any(
        s in text for s in ("gloo", "nccl", "connection closed", "connection reset",
                            "broken pipe", "timed out", "timeout"))


@contextmanager
def watching(place: Placement | None, timeout_s: float) -> Iterator[Heartbeat | None]:
    """Run the block with a heartbeat when several processes train (None for one). A failed
    collective becomes a :class:`DistributedError` naming the process that died; any other
    error is first posted so the other processes stop at once, naming this one."""
    if place is None or place.world_size < 2:
        yield None
        return
    hb = Heartbeat(place, timeout_s).start()
    try:
        yield hb
    except ChatftError as e:
        hb.report_failure(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    except Exception as e:
        if _is_distributed_failure(e):
            verdict = hb.verdict_after_failure()
            if verdict is not None:
                raise DistributedError(f"{place.where()}: stopping: {verdict}") from None
        hb.report_failure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    finally:
        hb.stop()
