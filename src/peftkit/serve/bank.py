"""The server's adapters: registered names, a CPU tier of checked adapters, and the slots they run in.

```
  register / reload ──read once, check──▶ CPU tier (LRU, --max-cpu-adapters) ──place──▶ slots (--max-adapters)
  (HTTP worker / loader thread)            ResidentAdapter: factors per layer         LoraStacks per layer
```

An adapter is *registered* (a name and a checked directory), *resident* (checked, in memory) and, while
requests use it, *in a slot* (written into every layer's stacks). Registration reads and checks the
files on the caller's thread; a resident adapter evicted from the CPU tier is read again by the loader
thread; neither ever runs on the engine's thread, so a stream never waits on disk. Placing a resident
adapter into a slot is a memory copy, done by the engine between forwards: a slot no running request
uses is reused (least recently used first); an adapter evicted from a slot stays resident and is not
read again. A request whose adapter needs a slot while all are busy *reserves* the slot with the
fewest users: no new request joins that slot, so it drains and the waiting adapter gets it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.serve.adapter_files import AdapterError, read_adapter_files, resolve_inside
from peftkit.serve.resident import ResidentAdapter, build_resident
from peftkit.serve.slots import BatchContext, SlotTable

__all__ = ["AdapterBank", "AdapterRecord", "SlotLease"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass
class AdapterRecord:
    """A registered adapter: its name, directory, rank, and whether its reads skip the root check
    (``trusted``: the operator's ``--adapter`` flags). ``error``: why its last reload failed."""

    name: str
    path: Path
    trusted: bool
    rank: int = 0
    loading: bool = True
    error: str | None = None


class SlotLease:
    """One running request's hold on a slot; :meth:`release` gives it back, once whatever calls it."""

    def __init__(self, bank: AdapterBank | None, slot: int) -> None:
        self.slot = slot
        self._bank = bank

    def release(self) -> None:
        """Give the slot back (a second call does nothing)."""
        bank, self._bank = self._bank, None
        if bank is not None:
            bank._release(self.slot)


BASE_LEASE = SlotLease(None, 0)  # the base model: slot 0, nothing to give back


class AdapterBank:
    """The adapters of one served model; see the module docstring.

    Args:
        model: the served model (its linear layers get wrapped here).
        context: where the host puts each forward's row → slot mapping.
        base_name: the base model's name in the API (an adapter may not take it).
        max_slots: adapters in slots at once (None: as many as are used, up to ``max_resident``).
        max_rank: the largest rank accepted, and the slots' rank (None: any; the slots grow).
        max_resident: adapters kept in the CPU tier, those in slots included (None: every registered one);
            at least ``max_slots``.
        root: the only directory runtime loading may read from; None: runtime loading is off.
        metrics: counts reads, placements and evictions (see :class:`~peftkit.serve.metrics.Metrics`).
    """

    def __init__(
        self,
        model: nn.Module,
        context: BatchContext,
        base_name: str,
        max_slots: int | None = None,
        max_rank: int | None = None,
        max_resident: int | None = None,
        root: Path | None = None,
        metrics: Any = None,
    ) -> None:
        if max_resident is not None and max_slots is not None and max_resident < max_slots:
            raise ValueError(
                f"max_resident {max_resident} is below max_slots {max_slots}: an adapter in a slot stays "
                "in memory, so the CPU tier holds at least as many as the slots; raise max_resident or "
                "lower max_slots"
            )
        self.model, self.base_name, self.root = model, base_name, root
        self.max_rank, self.max_resident = max_rank, max_resident
        self.metrics = metrics
        self.slots = SlotTable(model, context, max_slots or max_resident, max_rank)
        self.records: dict[str, AdapterRecord] = {}
        self.on_ready: Callable[[], None] = lambda: None  # called when a reload ends (the engine wakes)
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first
        self._users = [0] * (self.slots.count + 1)  # per slot (0: the base model): running requests
        self._last_used = [0] * (self.slots.count + 1)
        self._clock = 0
        self._reserved: tuple[int, str] | None = None  # (slot, adapter waiting for it)
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="peftkit-adapter-loader")

    # ----------------------------------------------------------------------------- API operations
    def register(self, name: str, path: str | Path, runtime: bool = True) -> AdapterRecord:
        """Read, check and keep the adapter in ``path`` as ``name`` (on the caller's thread).

        Args:
            runtime: a request asked for it (only directories inside ``root``); False for the
                operator's ``--adapter`` flags, trusted as given.

        Raises:
            AdapterError: runtime loading off (403), a path outside the root (403), a taken or invalid
                name, a missing directory or file, no safetensors file, an unreadable file, a rank above
                the limit, or an adapter that does not fit the served model (400). Nothing stays then.
        """
        if runtime and self.root is None:
            raise AdapterError(
                403, "loading adapters at run time is off; start the server with --adapter-root DIR"
            )
        directory = resolve_inside(self.root, path) if runtime else Path(path).resolve()
        record = AdapterRecord(name, directory, trusted=not runtime)
        with self._lock:
            self._check_name(name)
            self.records[name] = record  # the name is taken while the files are read
        try:
            resident = self._read(record)
        except BaseException:
            with self._lock:
                del self.records[name]
            raise
        with self._lock:
            record.rank, record.loading = resident.rank, False
            self._keep(resident)
        return record

    def unregister(self, name: str) -> None:
        """Forget the adapter ``name`` (its slot, if any, is free again).

        Raises:
            AdapterError: 404 unknown name, 409 running requests use it or it is being read.
        """
        with self._lock:
            record = self.records.get(name)
            if record is None:
                raise AdapterError(404, f"no adapter named {name!r} is loaded")
            slot = self.slots.slot_of(name)
            if slot is not None and self._users[slot]:
                raise AdapterError(
                    409, f"adapter {name!r} is in use by {self._users[slot]} running request(s)"
                )
            if record.loading:
                raise AdapterError(409, f"adapter {name!r} is being read; retry in a moment")
            del self.records[name]
            self._resident.pop(name, None)
            if slot is not None:
                self.slots.forget(slot)

    def names(self) -> list[str]:
        """The registered adapters (being read or not)."""
        with self._lock:
            return list(self.records)

    def loaded_names(self) -> list[str]:
        """The adapters in a slot now."""
        with self._lock:
            return [name for name in self.slots.names if name is not None]

    def resident_names(self) -> list[str]:
        """The adapters in the CPU tier now, least recently used first."""
        with self._lock:
            return list(self._resident)

    def close(self) -> None:
        """Stop the loader thread (a read in progress finishes; none starts)."""
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------- the engine's side
    def lease(self, name: str | None) -> SlotLease | None:
        """A slot holding ``name`` for one more running request (placing it there if need be), or None
        while it must wait (its files are being read, or every slot is busy). None: the base model.

        On the engine's thread, between forwards. Raises:
            AdapterError: 404 the name is no longer registered; 400 its files no longer load.
        """
        if name is None:
            return BASE_LEASE
        with self._lock:
            record = self.records.get(name)
            if record is None:
                raise AdapterError(404, f"adapter {name!r} was unloaded")
            if record.error is not None:
                raise AdapterError(400, record.error)
            slot = self.slots.slot_of(name)
            if slot is None:
                slot = self._place(record)
            elif self._reserved is not None and self._reserved[0] == slot and self._reserved[1] != name:
                slot = None  # draining for another adapter
            if slot is None:
                return None
            self._users[slot] += 1
            self._clock += 1
            self._last_used[slot] = self._clock
            return SlotLease(self, slot)

    def keep_reservation_for(self, waiting: set[str]) -> None:
        """Drop the slot reservation unless its adapter is among ``waiting`` (its requests left)."""
        with self._lock:
            if self._reserved is not None and self._reserved[1] not in waiting:
                self._reserved = None

    def _release(self, slot: int) -> None:
        with self._lock:
            self._users[slot] -= 1

    def _place(self, record: AdapterRecord) -> int | None:
        """Put the resident adapter into a slot and return it; None when it must wait (start its read if
        it is not resident; reserve a busy slot if none is free)."""
        resident = self._resident.get(record.name)
        if resident is None:
            if not record.loading:
                record.loading = True
                self._loader.submit(self._reload, record)
            return None
        slot = self._free_slot(record.name)
        if slot is None:
            return None
        evicted = self.slots.names[slot]
        self.slots.write(slot, resident)
        self._resident.move_to_end(record.name)
        self._count("adapter_placements")
        if evicted is not None:
            self._count("adapter_evictions", "slot")
            self._trim(keep=record.name)  # the evicted adapter may now be one too many in the CPU tier
        if self._reserved is not None and self._reserved[1] == record.name:
            self._reserved = None
        return slot

    def _free_slot(self, name: str) -> int | None:
        """An empty slot, a new one (below the limit), or the least recently used idle one (a slot
        reserved for another adapter excepted); else None, reserving the busy slot with the fewest users
        unless one is reserved already."""
        reserved = self._reserved
        idle = [
            slot
            for slot in range(1, self.slots.count + 1)
            if self._users[slot] == 0 and (reserved is None or reserved[1] == name or reserved[0] != slot)
        ]
        empty = [slot for slot in idle if self.slots.names[slot] is None]
        if empty:
            return empty[0]
        added = self.slots.add_slot()
        if added is not None:
            self._users.append(0)
            self._last_used.append(0)
            return added
        if idle:
            return min(idle, key=lambda slot: self._last_used[slot])
        if reserved is None:
            busy = range(1, self.slots.count + 1)
            self._reserved = (min(busy, key=lambda slot: (self._users[slot], self._last_used[slot])), name)
        return None

    # ----------------------------------------------------------------------------- reading
    def _read(self, record: AdapterRecord) -> ResidentAdapter:
        """Read and check ``record``'s files (the same checks for registration and reloads)."""
        files = read_adapter_files(record.path, None if record.trusted else self.root)
        self._count("adapter_reads")
        return build_resident(record.name, files, self.model, self.max_rank)

    def _reload(self, record: AdapterRecord) -> None:
        """On the loader thread: read an evicted adapter again, or record why it no longer loads."""
        try:
            resident, error = self._read(record), None
        except AdapterError as refused:
            resident, error = None, str(refused)
        except Exception as failed:  # anything else its files cause: the same, a 400 for its requests
            resident, error = None, f"{type(failed).__name__}: {failed}"
        with self._lock:
            if self.records.get(record.name) is record:
                record.loading = False
                if resident is not None:
                    self._keep(resident)
                else:
                    record.error = (
                        f"adapter {record.name!r} no longer loads from {record.path} ({error}); unload it "
                        "and load it again once its files are fixed"
                    )
        self.on_ready()

    def _keep(self, resident: ResidentAdapter) -> None:
        """Add ``resident`` to the CPU tier (then trimmed to ``max_resident``)."""
        self._resident[resident.name] = resident
        self._resident.move_to_end(resident.name)
        self._trim(keep=resident.name)

    def _trim(self, keep: str) -> None:
        """Drop the least recently used resident adapters that are in no slot (``keep`` excepted: it is
        about to be used), beyond ``max_resident``."""
        if self.max_resident is None:
            return
        for name in list(self._resident):
            if len(self._resident) <= self.max_resident:
                break
            if name != keep and self.slots.slot_of(name) is None:
                del self._resident[name]
                self._count("adapter_evictions", "cpu")

    def _check_name(self, name: str) -> None:
        if not _NAME.fullmatch(name) or name in (self.base_name, "__base__"):
            raise AdapterError(
                400,
                f"lora_name {name!r} is not a usable name: letters, digits and ._:/- (up to 128), not the "
                f"base model's name {self.base_name!r}",
            )
        if name in self.records:
            raise AdapterError(400, f"an adapter named {name!r} is loaded already; unload it first")

    def _count(self, metric: str, tier: str | None = None) -> None:
        if self.metrics is not None:
            counter = getattr(self.metrics, metric)
            (counter.labels(tier) if tier is not None else counter).inc()
