"""The scheduler: iteration-level (continuous) batching over one base model and its adapters.

One thread owns the model (through the host's lock). Each turn of its loop admits waiting requests
whose adapters are ready — prefilled together in one left-padded batch, each row with its own adapter
slot, each yielding its first token — then runs one decoding step: a single batched forward over every
running row. Finished and cancelled rows leave after the step; a request submitted meanwhile joins at
the next one. A request whose adapter is being read from disk, or waits for a busy slot, stays queued
without holding up those behind it.

Failures stay with their row: a sampling error ends that row alone; a prefill that fails is retried
row by row, so only the row that fails alone ends; a decoding step that fails ends the rows of that
step (its cache is then unusable) and the engine goes on. A request is never retried: its adapter
failing to load ends it with that error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from peftkit.ops.multi_lora import RowSlots
from peftkit.serve.adapter_files import AdapterError
from peftkit.serve.bank import AdapterBank
from peftkit.serve.batch_cache import attention_mask, drop_rows, join_row
from peftkit.serve.host import ModelHost
from peftkit.serve.metrics import Metrics
from peftkit.serve.rows import Event, GenerationRequest, Row

__all__ = ["Engine", "QueueFull", "ServerDraining"]

STALLED_AFTER_SECONDS = 60.0


class QueueFull(Exception):
    """Every slot runs and the waiting queue is full: the client should retry later."""


class ServerDraining(Exception):
    """The server is shutting down: no new requests."""


SHUTDOWN = Event(error="the server is shutting down; retry on another server or later", status=503)


class Engine:
    """Runs requests on the host's model in one scheduler thread; see the module docstring.

    Args:
        host: the model, its tokenizer and lock.
        bank: the adapters and their slots.
        metrics: where counts and timings go.
        base_name: the base model's name (the metrics' label for rows without an adapter).
        max_concurrent: the most requests in the running batch.
        max_queue: the most requests waiting to join it; beyond that :meth:`submit` raises
            :class:`QueueFull`.
    """

    def __init__(
        self,
        host: ModelHost,
        bank: AdapterBank,
        metrics: Metrics,
        base_name: str = "base",
        max_concurrent: int = 8,
        max_queue: int = 64,
    ) -> None:
        self.host, self.bank, self.metrics, self.base_name = host, bank, metrics, base_name
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.stalled_after = STALLED_AFTER_SECONDS
        self._wake = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: list[Row] = []
        self._cache: Any = None
        self._slots: tuple[tuple[int, ...], int, RowSlots] | None = None  # the running rows' mapping
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self._progress_at = time.monotonic()
        self._changes = 0  # submissions, cancellations and finished reads: what a waiting turn waits for
        self._seen_changes = 0  # the count when the last admission looked at the queue
        bank.on_ready = self._notify
        metrics.running.set_function(lambda: len(self._rows))

    # ----------------------------------------------------------------------------- clients' side
    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; it joins the batch at a coming step.

        Raises:
            QueueFull: ``max_queue`` requests are waiting already.
            ServerDraining: the server is shutting down.
        """
        with self._wake:
            if self._stopping or self._drain_deadline is not None:
                raise ServerDraining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._changes += 1
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Stop working on ``request`` (its client went away): it leaves at the next step, no more events."""
        if request.cancelled:
            return
        request.cancelled = True
        with self._wake:
            if request in self._waiting:
                self._waiting.remove(request)
                self.metrics.queue_depth.set(len(self._waiting))
                self.metrics.finished.labels(self._label(request), "cancelled").inc()
            self._changes += 1
            self._wake.notify()

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="peftkit-serve-engine", daemon=True)
        self._thread.start()

    def drain(self, grace_seconds: float) -> None:
        """Begin shutting down: refuse new requests, end the waiting ones with a 503 now, and the running
        ones that have not finished ``grace_seconds`` from now."""
        with self._wake:
            self._drain_deadline = time.monotonic() + grace_seconds
            waiting, self._waiting = list(self._waiting), deque()
            self.metrics.queue_depth.set(0)
            self._wake.notify()
        for request in waiting:
            self.metrics.finished.labels(self._label(request), "shutdown").inc()
            request.send(SHUTDOWN)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests still waiting or running get a 503."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.host.lock.acquire(timeout=timeout):  # not if a forward hangs: its rows stay as they are
            try:
                self._end_all(SHUTDOWN, "shutdown")
            finally:
                self.host.lock.release()
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            request.send(SHUTDOWN)
        self.bank.close()

    def health(self) -> dict[str, Any]:
        """``status``: ``ok``; ``draining`` (shutting down); ``stalled`` (work waits and the loop made no
        progress for :attr:`stalled_after` seconds); ``stopped`` (the thread is not running). Also the
        running and waiting counts and the seconds since the loop last made progress."""
        quiet = time.monotonic() - self._progress_at
        busy = bool(self._rows or self._waiting)
        if self._thread is None or not self._thread.is_alive():
            status = "stopped"
        elif self._drain_deadline is not None or self._stopping:
            status = "draining"
        elif busy and quiet > self.stalled_after:
            status = "stalled"
        else:
            status = "ok"
        return {
            "status": status,
            "running": len(self._rows),
            "waiting": len(self._waiting),
            "seconds_since_progress": round(quiet if busy else 0.0, 3),
        }

    @property
    def running(self) -> tuple[Row, ...]:
        """The rows in the batch now."""
        return tuple(self._rows)

    @property
    def waiting(self) -> int:
        """How many requests wait to join the batch."""
        return len(self._waiting)

    # ----------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopping or self._waiting or self._rows):
                        self._progress_at = time.monotonic()
                        self._wake.wait()
                    if self._stopping:
                        return
                with self.host.lock:
                    try:
                        busy = self._turn()
                    except Exception as error:  # a fault of the engine itself: these rows end, it goes on
                        self._end_all(
                            Event(error=f"generation failed: {type(error).__name__}: {error}"), "failed"
                        )
                        busy = True
                self._progress_at = time.monotonic()
                if not busy:  # what waits, waits on a read or a slot: sleep until something changes
                    with self._wake:
                        if self._changes == self._seen_changes:
                            self._wake.wait(0.5)

    def _turn(self) -> bool:
        """One turn: end the rows past the shutdown grace, admit, run one decoding step. False when
        nothing could run."""
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self._end_all(SHUTDOWN, "shutdown")
        joining = self._admit()
        if joining:
            self._prefill(joining)
        if self._rows:
            self._step()
        return bool(joining or self._rows)

    def _admit(self) -> list[Row]:
        """Take waiting requests, first come first served, while the batch has room; a request whose
        adapter is not ready stays, without holding up those behind it."""
        joining: list[Row] = []
        with self._wake:
            queue = list(self._waiting)
            self._seen_changes = self._changes
        self.bank.keep_reservation_for({request.adapter for request in queue if request.adapter is not None})
        for request in queue:
            if len(self._rows) + len(joining) >= self.max_concurrent:
                break
            try:
                lease = self.bank.lease(request.adapter)
            except AdapterError as error:  # unloaded since it was queued, or its files no longer load
                self._dequeue(request)
                self.metrics.finished.labels(self._label(request), "failed").inc()
                request.send(Event(error=str(error), status=error.status))
                continue
            if lease is None:
                continue
            if not self._dequeue(request):  # cancelled meanwhile
                lease.release()
                continue
            joining.append(Row(request, lease, self.host, self.metrics, self._label(request)))
        return joining

    def _dequeue(self, request: GenerationRequest) -> bool:
        """Take ``request`` out of the queue; False if it left already (cancelled)."""
        with self._wake:
            if request not in self._waiting:
                return False
            self._waiting.remove(request)
            self.metrics.queue_depth.set(len(self._waiting))
            return True

    def _prefill(self, joining: list[Row]) -> None:
        """Run the joining rows' prompts in one left-padded batch, take each one's first token, and add
        the rows that go on to the running batch. If the batch fails, each row is prefilled alone: only
        a row that fails alone ends (with the error)."""
        try:
            logits, cache = self._prefill_forward(joining)
        except Exception as error:
            if len(joining) == 1:
                joining[0].end(Event(error=f"generation failed for this request: {error}"), "failed")
            else:
                for row in joining:
                    self._prefill([row])
            return
        lengths = [len(row.request.prompt_ids) for row in joining]
        self.metrics.prompt_tokens.inc(sum(lengths))
        going_on = [index for index, row in enumerate(joining) if not row.take(logits[index])]
        if going_on:
            kept = drop_rows(cache, going_on, max(lengths[index] for index in going_on))
            self._cache = join_row(self._cache, kept)
            self._rows += [joining[index] for index in going_on]

    def _prefill_forward(self, joining: list[Row]) -> tuple[torch.Tensor, Any]:
        """(joining, vocab) logits of each prompt's last position, and the rows' new KV cache."""
        device = self.host.device
        prompts = [row.request.prompt_ids for row in joining]
        longest = max(len(prompt) for prompt in prompts)
        pad = self.host.tokenizer.pad_token_id if self.host.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (longest - len(prompt)) + prompt for prompt in prompts], device=device)
        mask = attention_mask([len(prompt) for prompt in prompts], longest, device)  # (joining, longest)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (joining, longest): 0 from each row's first token
        cache = self.host.new_cache()
        rows = RowSlots([row.slot for row in joining], device)
        return self.host.forward(ids, mask, positions, cache, rows, last_only=True), cache

    def _step(self) -> None:
        """One decoding step for every running row: one batched forward, one token per row."""
        for row in self._rows:
            if row.request.cancelled:
                row.end(Event(error="cancelled"), "cancelled")
        self._leave()
        if not self._rows:
            return
        device = self.host.device
        lengths = [row.length for row in self._rows]
        columns = self._cache.layers[0].keys.shape[2]
        ids = torch.tensor([[row.generated[-1]] for row in self._rows], device=device)  # (batch, 1)
        mask = attention_mask([n + 1 for n in lengths], columns + 1, device)  # (batch, columns + 1)
        positions = torch.tensor(lengths, device=device)[:, None]  # (batch, 1): each row's next position
        try:
            logits = self.host.forward(ids, mask, positions, self._cache, self._row_slots())
        except Exception as error:  # the cache may be half-written: these rows cannot go on
            self._end_all(Event(error=f"generation failed: {error}"), "failed")
            return
        self.metrics.batch_occupancy.observe(len(self._rows))
        for index, row in enumerate(self._rows):
            row.length += 1
            row.take(logits[index])
        self._leave()

    def _row_slots(self) -> RowSlots:
        """The running rows' slots, made again only when the rows or the bank's slots changed."""
        key = (tuple(row.slot for row in self._rows), self.bank.slots.version)
        if self._slots is None or self._slots[:2] != key:
            self._slots = (*key, RowSlots(key[0], self.host.device))
        return self._slots[2]

    def _leave(self) -> None:
        """Take ended rows out of the batch and their rows out of the cache."""
        keep = [index for index, row in enumerate(self._rows) if not row.ended]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[index] for index in keep]
        longest = max((row.length for row in self._rows), default=0)
        self._cache = drop_rows(self._cache, keep, longest)

    def _end_all(self, event: Event, outcome: str) -> None:
        for row in self._rows:
            row.end(event, outcome)
        self._rows, self._cache = [], None

    def _label(self, request: GenerationRequest) -> str:
        return request.adapter or self.base_name

    def _notify(self) -> None:
        with self._wake:
            self._changes += 1
            self._wake.notify()
