"""Model control: what the server serves after start, and how a model is swapped safely.

The modes are Triton's. `poll` reads the repository every interval and applies what
changed; `explicit` loads and unloads what RepositoryModelLoad/Unload ask for. Either
way one procedure runs: a new version is loaded and warmed beside the old one and
swapped in only if it is ready; requests already queued on the old version are answered
by it before it is retired. Unloading removes the model first (new requests get
NOT_FOUND), then answers what was queued. In `poll` mode a version that fails to load
leaves the old one serving and is not retried (publish a newer version to try again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from contract.repository import RepositoryError, check_model_name, list_models, list_versions
from service.engine.models import ModelSet, ServedModel, load_model
from service.engine.options import EngineOptions
from service.engine.runtime import CPU_ONLY, Placement
from service.observability.metrics import Metrics
from service.status import ServingError, Status, shown

log = logging.getLogger(__name__)


def newest_versions(repo: Path) -> dict[str, int]:
    return {name: max(list_versions(repo, name)) for name in list_models(repo)}


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class VersionState:
    """One version in the repository, as RepositoryIndex reports it."""

    name: str
    version: int
    state: str
    """READY, UNAVAILABLE or UNLOADED."""
    reason: str


class ModelControl:
    def __init__(self, settings: EngineOptions, models: ModelSet, executor: Executor,
                 metrics: Metrics, on_change: Callable[[], Awaitable[None]] = _nothing,
                 placement: Placement = CPU_ONLY) -> None:
        self._settings, self._models = settings, models
        self._placement = placement
        self._executor, self._metrics = executor, metrics
        self._on_change = on_change
        """Announces what is served (health, probes)."""
        self._failed: dict[str, int] = {}
        """Per model, the newest version that failed to load in poll mode: not retried."""
        self._unloaded: set[str] = set()
        self._lock = asyncio.Lock()  # one load, unload or poll at a time

    @property
    def explicit(self) -> bool:
        return self._settings.model_control_mode == "explicit"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._settings.polls)
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
        async with self._lock:
            retired: list[ServedModel] = []
            changed = False
            for name, newest in found.items():
                current = self._models.current(name)
                if (current is not None and newest <= current.version) or \
                        self._failed.get(name) == newest:
                    continue
                try:
                    candidate = await self._load(name)
                except RepositoryError as exc:  # e.g. the model left between the reads
                    self._failed[name] = newest
                    log.error("model %s version %d not loaded: %s", name, newest, exc)
                    continue
                if not candidate.ready:
                    self._failed[name] = candidate.version
                    if current is not None and current.ready:
                        log.error("model %s version %d not loaded, version %d keeps serving: %s",
                                  name, candidate.version, current.version, candidate.reason)
                        continue
                retired += self._swap_in(candidate, current)
                changed = True
            for name in self._models.names() - set(found):
                log.info("model %s left the repository: unloading", name)
                retired.append(self._models.remove(name))
            if changed or retired:
                await self._apply(retired)
            return changed or bool(retired)

    async def load(self, name: str) -> ServedModel:
        """Load (or reload) `name`'s newest version and serve it; the version it replaces
        answers what it has queued. ServingError if it is not ready: the old one stays."""
        self._require_explicit("load")
        try:
            check_model_name(name)
            versions = await asyncio.to_thread(list_versions, self._settings.repo, name)
        except RepositoryError as exc:
            raise ServingError(Status.INVALID_ARGUMENT, str(exc)) from None
        if not versions:
            raise ServingError(Status.NOT_FOUND, f"no model {shown(name)} in the repository "
                                                 f"{self._settings.repo}")
        async with self._lock:
            current = self._models.current(name)
            candidate = await self._load(name)
            if not candidate.ready:
                raise ServingError(Status.INVALID_ARGUMENT,
                                   f"model {shown(name)} version {candidate.version} did not "
                                   f"load: {candidate.reason}"
                                   + (f"; version {current.version} keeps serving"
                                      if current is not None and current.ready else ""))
            self._unloaded.discard(name)
            await self._apply(self._swap_in(candidate, current))
            return candidate

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests get NOT_FOUND, queued ones are answered."""
        self._require_explicit("unload")
        async with self._lock:
            if self._models.current(name) is None:
                known = await asyncio.to_thread(list_models, self._settings.repo)
                if name not in known:
                    raise ServingError(Status.NOT_FOUND, f"no model {shown(name)} is loaded or "
                                                         "in the repository")
                return
            log.info("model %s: unloading", name)
            self._unloaded.add(name)
            await self._apply([self._models.remove(name)])

    async def index(self) -> list[VersionState]:
        """Every version in the repository and what became of it."""
        found = await asyncio.to_thread(
            lambda: {n: list_versions(self._settings.repo, n)
                     for n in list_models(self._settings.repo)})
        states = []
        for name in sorted(found.keys() | self._models.names()):
            served = self._models.current(name)
            for version in found.get(name) or [served.version if served else 0]:
                if served is not None and served.version == version:
                    states.append(VersionState(name, version, "READY" if served.ready
                                               else "UNAVAILABLE", served.reason))
                elif name in self._unloaded:
                    states.append(VersionState(name, version, "UNLOADED", "unloaded"))
                elif served is None:
                    states.append(VersionState(name, version, "UNAVAILABLE", "not loaded"))
                else:
                    states.append(VersionState(
                        name, version, "UNAVAILABLE",
                        f"version {served.version} is served (the newest ready version)"))
        return states

    def _require_explicit(self, what: str) -> None:
        if not self.explicit:
            raise ServingError(Status.FAILED_PRECONDITION,
                               f"explicit model {what} needs --model-control-mode explicit; "
                               f"this server runs in mode "
                               f"{self._settings.model_control_mode}")

    async def _load(self, name: str) -> ServedModel:
        return await asyncio.to_thread(load_model, self._settings, name, self._executor,
                                       self._metrics, self._placement)

    def _swap_in(self, candidate: ServedModel, current: ServedModel | None
                 ) -> list[ServedModel]:
        if candidate.batcher is not None:
            candidate.batcher.start()
        self._models.put(candidate)
        log.info("model %s: version %d now served%s", candidate.name, candidate.version,
                 f" (was {current.version})" if current else "")
        return [current] if current is not None else []

    async def _apply(self, retired: list[ServedModel]) -> None:
        """Announce the change (health, probes), then let each retired version answer
        its queue."""
        await self._on_change()
        for old in retired:  # after the swap, so new requests already go to the new version
            if old.batcher is not None:
                await old.batcher.close()
