"""Many LoRA adapters over one base model in a replica.

The base is in memory once; adapters are loaded into it by name (`peft`), and a batch runs with
one adapter active, or with none for the base. Which adapters stay loaded is Ray Serve's model
multiplexing: it keeps the most recently used `max_adapters_per_replica` and routes a request to
a replica that has its adapter. When it unloads one, the adapter is only marked; it leaves the
model before the next batch that does not use it, never under a batch that does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator

import torch

from janus_lab.model.adapters import AdapterError, attach_adapter, is_adapter_folder, read_base

logger = logging.getLogger("ray.serve")


def local_adapter_folder(uri: str) -> Path:
    """An adapter's folder on this machine: as given, downloaded from `s3://`, or from the registry."""
    from janus_lab.generation.loading import local_folder, resolve_model_uri

    return local_folder(resolve_model_uri(uri))


class AdapterHost:
    """A base model and the adapters loaded into it.

    Args:
        model: the base (the generation engine's model).
        identity: the base's `AdapterBase.identity`; an adapter trained on another base is refused.
        sources: adapter name -> URI (the server's `adapters`).
    """

    def __init__(self, model: torch.nn.Module, identity: str, sources: dict[str, str]):
        self.model, self.identity, self.sources = model, identity, dict(sources)
        self.wrapped = None  # the PeftModel around `model`, once the first adapter is in
        self.loaded: set[str] = set()
        self.retired: set[str] = set()
        self.lock = threading.Lock()  # held by a batch while it generates, and by a load

    def load(self, name: str) -> None:
        """Loads adapter `name` into the base (blocking; a no-op when it is in already).

        Raises:
            AdapterError: an unknown name, a folder that is not an adapter, or one trained on
                another base.
        """
        if name not in self.sources:
            served = ", ".join(sorted(self.sources)) or "none"
            raise AdapterError(f"no adapter named {name!r}; this server has: {served}")
        uri = self.sources[name]
        folder = local_adapter_folder(uri)
        if not is_adapter_folder(folder):
            raise AdapterError(f"adapter {name}: {uri} is not a LoRA adapter (no adapter_config.json)")
        base = read_base(folder)
        if base.identity != self.identity:
            raise AdapterError(f"adapter {name} ({uri}) was trained on {base.identity}, but this server's "
                               f"model is {self.identity}; an adapter only fits its own base")
        with self.lock:
            self._load_locked(name, folder)

    def _load_locked(self, name: str, folder: Path) -> None:
        self.retired.discard(name)
        if name in self.loaded:
            return
        self.wrapped = attach_adapter(self.model, folder, name, self.wrapped)
        self.loaded.add(name)
        logger.info("adapter %s loaded (%d in this replica)", name, len(self.loaded))

    def retire(self, name: str) -> None:
        """Marks an adapter to leave the model before the next batch that does not use it."""
        self.retired.add(name)

    @contextlib.contextmanager
    def using(self, name: str | None, batch_names: set[str | None]) -> Iterator[None]:
        """Runs the body with adapter `name` active (None: the base alone), holding the model.

        Args:
            batch_names: every adapter the running batch uses: retired ones among them stay.
        """
        with self.lock:
            for gone in sorted(self.retired - batch_names):
                if gone in self.loaded:
                    self.wrapped.delete_adapter(gone)
                    self.loaded.discard(gone)
                    logger.info("adapter %s unloaded", gone)
            self.retired -= self.retired - batch_names
            if name is not None and name not in self.loaded:  # unloaded between its request and its batch
                self._load_locked(name, local_adapter_folder(self.sources[name]))
            if name is None and self.loaded:
                with self.wrapped.disable_adapter():
                    yield
                return
            if name is not None:
                self.wrapped.set_adapter(name)
            yield


class AdapterHandle:
    """What the multiplexed loader returns: Ray Serve calls `__del__` when it unloads the adapter."""

    def __init__(self, host: AdapterHost, name: str):
        self.host, self.name, self._gone = host, name, False

    def __del__(self) -> None:
        if not self._gone:  # Serve calls it on eviction, and Python again at garbage collection
            self._gone = True
            self.host.retire(self.name)
