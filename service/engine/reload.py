"""Hot reload: poll the repository, load new models and versions, swap them in safely.

A new version is loaded and warmed beside the old one and swapped in only if it is
ready; requests already queued on the old version are answered by it before it is
retired. A version that fails to load leaves the old one serving and is not retried
(publish a newer version to try again). A model removed from the repository is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

from contract.repository import RepositoryError, list_models, list_versions
from service.engine.models import ModelSet, ServedModel, load_model
from service.metrics import Metrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def newest_versions(repo: Path) -> dict[str, int]:
    return {name: max(list_versions(repo, name)) for name in list_models(repo)}


class RepositoryWatcher:
    def __init__(self, settings: ServiceSettings, models: ModelSet, executor: Executor,
                 metrics: Metrics, on_change: Callable[[], Awaitable[None]]) -> None:
        self._settings, self._models = settings, models
        self._executor, self._metrics = executor, metrics
        self._on_change = on_change
        self._failed: dict[str, int] = {}
        """Per model, the newest version that failed to load: not retried."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reload_interval_s)
            try:
                await self.poll()
            except Exception:  # a reload problem must never stop the server
                log.exception("repository poll failed; serving what is loaded")

    async def poll(self) -> bool:
        """Apply what changed in the repository since the last poll; True if anything did."""
        try:
            found = await asyncio.to_thread(newest_versions, self._settings.repo)
        except RepositoryError as exc:
            log.warning("repository unreadable, serving what is loaded: %s", exc)
            return False
        retired: list[ServedModel] = []
        changed = False
        for name, newest in found.items():
            current = self._models.current(name)
            if (current is not None and newest <= current.version) or \
                    self._failed.get(name) == newest:
                continue
            try:
                candidate = await asyncio.to_thread(load_model, self._settings, name,
                                                    self._executor, self._metrics)
            except RepositoryError as exc:  # e.g. an invalid config.json: skip this model
                self._failed[name] = newest
                log.error("model %s version %d not loaded: %s", name, newest, exc)
                continue
            if not candidate.ready:
                self._failed[name] = candidate.version
                if current is not None and current.ready:
                    log.error("model %s version %d not loaded, version %d keeps serving: %s",
                              name, candidate.version, current.version, candidate.reason)
                    continue
            if candidate.batcher is not None:
                candidate.batcher.start()
            self._models.put(candidate)
            changed = True
            log.info("model %s: version %d now served%s", name, candidate.version,
                     f" (was {current.version})" if current else "")
            if current is not None:
                retired.append(current)
        for name in self._models.names() - set(found):
            log.info("model %s left the repository: unloading", name)
            retired.append(self._models.remove(name))
        if changed or retired:
            await self._on_change()
        for old in retired:  # after the swap, so new requests already go to the new version
            if old.batcher is not None:
                await old.batcher.close()
        return changed or bool(retired)
