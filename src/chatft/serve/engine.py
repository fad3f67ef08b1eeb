"""One model, many requests: a worker thread that batches whatever is waiting.

The server's event loop never runs the model. It submits a :class:`~chatft.serve.batch.Sequence`
and receives its events through the sequence's ``sink``, which the worker calls. The worker
loop, each iteration:

1. takes waiting sequences into the running batch (up to ``max_batch_size`` rows and
   ``max_prefill_tokens`` padded prompt tokens per prefill) and prefills them together;
2. runs one decode step for every running sequence (cancelled ones are dropped first);
3. sleeps on a condition variable only when nothing is waiting or running.

A request joins at the next step boundary instead of waiting for the running batch to end,
and a finished or cancelled one leaves at the next step boundary. An exception from the
model fails the sequences of that batch (their owners get an "error" event) and the worker
keeps serving.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from dataclasses import dataclass, asdict

from chatft.serve.batch import DecodeBatch, Event, Sequence
from chatft.serve.generate import ChatModel

log = logging.getLogger("chatft.serve")


@dataclass
class EngineStats:
    """Counters since start (``/health`` shows them)."""

    running: int = 0
    waiting: int = 0
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0
    max_batch_seen: int = 0


class Engine:
    def __init__(self, cm: ChatModel, max_batch_size: int = 32, max_prefill_tokens: int = 8192):
        self.cm = cm
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self._batch: DecodeBatch = cm.new_batch()
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="chatft-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def submit(self, seq: Sequence) -> Sequence:
        """Queue ``seq``; its sink is called from the worker thread from now on."""
        inner = seq.sink

        def counted(ev: Event) -> None:
            if ev.finish_reason is not None:
                with self._cond:
                    st = self._stats
                    st.generated_tokens += ev.completion_tokens
                    if ev.finish_reason == "cancelled":
                        st.cancelled += 1
                    elif ev.finish_reason == "error":
                        st.failed += 1
                    else:
                        st.completed += 1
            inner(ev)

        seq.sink = counted
        with self._cond:
            self._stats.submitted += 1
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Remove ``seq`` (waiting or running) at the next step boundary."""
        seq.cancel()
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            st = self._stats
            st.waiting = len(self._waiting)
            # Counted from the finish counters, which are updated before a request's final
            # event reaches its client: a client that got its answer is never "running".
            st.running = st.submitted - st.waiting - st.completed - st.cancelled - st.failed
            return asdict(st)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _take_waiting(self) -> list[Sequence]:
        """Waiting sequences that fit in the batch and one prefill (called under the lock)."""
        taken: list[Sequence] = []
        room = self.max_batch_size - len(self._batch)
        longest = 0
        while self._waiting and len(taken) < room:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                seq.finish("cancelled")
                continue
            # A left-padded prefill costs (rows x longest prompt) tokens.
            width = max(longest, len(seq.prompt_ids))
            if taken and width * (len(taken) + 1) > self.max_prefill_tokens:
                break
            longest = width
            taken.append(self._waiting.popleft())
        return taken

    def _run(self) -> None:
        batch = self._batch
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not len(batch):
                    self._cond.wait()
                if self._stopping:
                    break
                new = self._take_waiting()
            try:
                if new:
                    batch.admit(new)
                    with self._cond:
                        self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(batch))
                batch.step()
            except Exception as e:  # the model failed: fail this batch, keep serving
                log.error("generation failed:\n%s", traceback.format_exc())
                message = f"generation failed: {type(e).__name__}: {e}"
                for seq in new:
                    seq.finish("error", message)
                batch.fail_all(message)
        with self._cond:
            for seq in self._waiting:
                seq.finish("cancelled")
            self._waiting.clear()
        batch.fail_all("the server is shutting down")
