"""The adapters a server knows: registering (with the safety checks), loading just in time, LRU eviction.

An adapter is *registered* (a name and a checked directory) and, while there is room, *loaded* into the
``PeftModel``. With ``max_loaded`` set, a request for a registered adapter that is not loaded loads it,
first evicting the least recently used loaded adapter that no running request uses. Every change to
the model happens under :attr:`AdapterRegistry.lock`, which the engine holds while the model runs.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.foundation.io import CONFIG_NAME, PICKLED_WEIGHTS_NAMES, WEIGHTS_NAME

__all__ = ["AdapterError", "AdapterRecord", "AdapterRegistry", "adapter_rank", "resolve_inside"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class AdapterError(Exception):
    """A refused adapter operation; ``status`` is the HTTP status that says why (4xx, or 503: busy)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AdapterRecord:
    """A registered adapter: its name, checked directory, rank, and whether it is in the model now."""

    name: str
    path: Path
    rank: int
    loaded: bool = False
    last_used: int = 0


def resolve_inside(root: Path, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, refused unless it lies inside ``root``.

    Symbolic links are resolved first, so neither ``..`` nor a link can lead out of ``root``; the two
    adapter files are checked the same way (a link inside the directory pointing elsewhere is refused).

    Raises:
        AdapterError: 403 outside ``root``, 400 no such directory or no adapter files in it.
    """
    root = root.resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise AdapterError(403, f"lora_path {path!r} is outside the adapter root {str(root)!r}")
    if not resolved.is_dir():
        raise AdapterError(400, f"lora_path {path!r}: no such directory under the adapter root")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = resolved / name
        if file.exists() and not file.resolve().is_relative_to(root):
            raise AdapterError(403, f"lora_path {path!r}: {name} links outside the adapter root")
    return resolved


def adapter_rank(config: dict[str, Any]) -> int:
    """The largest rank an adapter config uses (``r`` and any ``rank_pattern`` value); 0 if it has none."""
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


class AdapterRegistry:
    """The server's adapters over one ``PeftModel``; see the module docstring.

    Args:
        model: the served ``PeftModel``.
        base_name: the base model's name in the API (an adapter may not take it).
        max_loaded: the most adapters in the model at once (None: no limit).
        max_rank: the largest rank accepted (None: any).
        root: the only directory runtime loading may read from; None: runtime loading is off.
    """

    def __init__(
        self,
        model: Any,
        base_name: str,
        max_loaded: int | None = None,
        max_rank: int | None = None,
        root: Path | None = None,
    ) -> None:
        self.model = model
        self.base_name = base_name
        self.max_loaded = max_loaded
        self.max_rank = max_rank
        self.root = root
        self.lock = threading.RLock()
        self.records: dict[str, AdapterRecord] = {}
        self.in_use: Counter[str] = Counter()
        self.version = 0  # counts changes to the loaded adapters (a routing made before one is stale)
        self._clock = 0

    # ----------------------------------------------------------------------------- API operations
    def register(self, name: str, path: str | Path, runtime: bool = True) -> AdapterRecord:
        """Check and load the adapter in ``path`` as ``name``.

        Args:
            runtime: a request asked for it (only directories inside ``root``); False for the
                operator's ``--adapter`` flags, trusted as given.

        Raises:
            AdapterError: runtime loading off (403), a path outside the root (403), a taken or invalid
                name, a missing directory, no safetensors file, a rank above the limit, a model-level
                method or tensors that do not fit the base (400), no free slot (503). Nothing stays
                loaded or registered then.
        """
        if runtime:
            if self.root is None:
                raise AdapterError(
                    403, "loading adapters at run time is off; start the server with --adapter-root DIR"
                )
            directory = resolve_inside(self.root, str(path))
        else:
            directory = Path(path).resolve()
        with self.lock:
            self._check_name(name)
            config = _read_config(directory)
            rank = adapter_rank(config)
            if self.max_rank is not None and rank > self.max_rank:
                raise AdapterError(
                    400, f"adapter {name!r} has rank {rank}, above this server's --max-rank {self.max_rank}"
                )
            record = AdapterRecord(name=name, path=directory, rank=rank)
            self.records[name] = record
            try:
                if not self._load(record):
                    raise AdapterError(
                        503,
                        f"all {self.max_loaded} loaded adapters are in use by running requests; retry later",
                    )
            except BaseException:
                del self.records[name]
                raise
            return record

    def unregister(self, name: str) -> None:
        """Unload the adapter ``name`` and forget it.

        Raises:
            AdapterError: 404 unknown name, 409 running requests use it.
        """
        with self.lock:
            if name not in self.records:
                raise AdapterError(404, f"no adapter named {name!r} is loaded")
            if self.in_use[name]:
                raise AdapterError(
                    409, f"adapter {name!r} is in use by {self.in_use[name]} running request(s)"
                )
            self._evict(self.records.pop(name))

    def loaded_names(self) -> list[str]:
        """The adapters in the model now."""
        with self.lock:
            return [name for name, record in self.records.items() if record.loaded]

    # ----------------------------------------------------------------------------- the engine's side
    def acquire(self, name: str | None) -> bool:
        """Make ``name`` loaded and count one more running request on it; False when no slot is free now.

        None (the base model) always succeeds.

        Raises:
            AdapterError: 404 the name is no longer registered; 400 its files no longer load.
        """
        if name is None:
            return True
        with self.lock:
            record = self.records.get(name)
            if record is None:
                raise AdapterError(404, f"adapter {name!r} was unloaded")
            if not record.loaded and not self._load(record):
                return False
            self._clock += 1
            record.last_used = self._clock
            self.in_use[name] += 1
            return True

    def release(self, name: str | None) -> None:
        """One running request on ``name`` ended."""
        if name is not None:
            with self.lock:
                self.in_use[name] -= 1

    # ----------------------------------------------------------------------------- loading
    def _check_name(self, name: str) -> None:
        if not _NAME.fullmatch(name) or name in (self.base_name, "__base__"):
            raise AdapterError(
                400,
                f"lora_name {name!r} is not a usable name: letters, digits and ._:/- (up to 128), not the "
                f"base model's name {self.base_name!r}",
            )
        if name in self.records:
            raise AdapterError(400, f"an adapter named {name!r} is loaded already; unload it first")

    def _load(self, record: AdapterRecord) -> bool:
        """Load ``record`` into the model, evicting the least recently used idle adapter if full."""
        loaded = [r for r in self.records.values() if r.loaded]
        if self.max_loaded is not None and len(loaded) >= self.max_loaded:
            idle = sorted((r for r in loaded if not self.in_use[r.name]), key=lambda r: r.last_used)
            if not idle:
                return False
            self._evict(idle[0])
        import torch

        from peftkit.core.whole_model import is_model_level

        self.version += 1  # even a load that fails and is undone may have changed wrappers
        try:
            with torch.inference_mode(False):  # ordinary tensors, even when the engine thread loads it
                self.model.load_adapter(record.path, adapter_name=record.name)
        except (ValueError, FileNotFoundError, KeyError) as error:
            raise AdapterError(
                400, f"adapter {record.name!r} does not fit the served model: {error}"
            ) from error
        if is_model_level(self.model.peft_config[record.name]):
            self.model.delete_adapter(record.name)
            raise AdapterError(
                400,
                f"adapter {record.name!r} is a soft prompt or selective adapter; the server mixes layer "
                "adapters (LoRA, IA³, bottleneck) only",
            )
        record.loaded = True
        return True

    def _evict(self, record: AdapterRecord) -> None:
        if record.loaded:
            self.model.delete_adapter(record.name)
            record.loaded = False
            self.version += 1


def _read_config(directory: Path) -> dict[str, Any]:
    """The adapter config in ``directory``, after checking the weights are a safetensors file."""
    if not (directory / CONFIG_NAME).is_file():
        raise AdapterError(400, f"{directory} has no {CONFIG_NAME}: is it an adapter directory?")
    if not (directory / WEIGHTS_NAME).is_file():
        pickled = [name for name in PICKLED_WEIGHTS_NAMES if (directory / name).is_file()]
        hint = f" (it has {pickled[0]}: pickle files are never loaded)" if pickled else ""
        raise AdapterError(400, f"{directory} has no {WEIGHTS_NAME}{hint}")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(400, f"{directory / CONFIG_NAME} cannot be read: {error}") from error
    if not isinstance(config, dict):
        raise AdapterError(400, f"{directory / CONFIG_NAME} is not a JSON object")
    return config
