"""Shared memory regions clients register, as Triton's extensions have them.

A client creates a POSIX shared memory object (`/dev/shm/<key>`), registers a window of
it under a name, and then names that region in its requests instead of sending tensor
bytes: inputs are read from it in place, outputs written into it. Protocol-neutral, so
every front-end shares one registry per server process.

What a client gets: keys that are one plain name (no paths, no symlinks followed),
windows that must lie inside the object, at most MAX_REGIONS regions, and every region
unmapped when it is unregistered or the server stops. Reading past the end of a mapped
object kills a process (SIGBUS), and its owner may shrink it at any time: so each access
first checks the object's size, and inputs are copied out at once (one memcpy, never
through gRPC) rather than read by the model later. A shrink in the microseconds between
check and copy can still crash the server; with auth on, only token holders register.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.status import ServingError, Status, invalid, shown

SHM_DIR = Path("/dev/shm")
MAX_REGIONS = 256
_KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    fd: int
    """Kept open to check the object's size before each access."""


def check_new_region(kind: str, name: str, registered: Collection[str]) -> None:
    """A region may be registered under `name`: refuse bad or taken names, and more than
    MAX_REGIONS of one kind."""
    if not name or len(name) > 200:
        invalid(f"a region needs a name of 1 to 200 characters, got {len(name)}")
    if name in registered:
        raise ServingError(Status.ALREADY_EXISTS, f"{kind} region {shown(name)} is already "
                                                  "registered; unregister it first")
    if len(registered) >= MAX_REGIONS:
        raise ServingError(Status.RESOURCE_EXHAUSTED,
                           f"{MAX_REGIONS} {kind} regions are registered, the most this "
                           "server holds; unregister some first")


class SharedMemoryRegistry:
    def __init__(self, directory: Path = SHM_DIR) -> None:
        self._directory = directory
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        check_new_region("system shared memory", name, self._regions)
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            invalid(f"shared memory key {shown(key)} must be one name of letters, digits, "
                    "'_', '.' or '-' (optionally after a leading '/'), as shm_open takes")
        if byte_size < 1:
            invalid("byte_size must be at least 1")
        path = self._directory / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ServingError(Status.NOT_FOUND,
                               f"shared memory key {shown(key)} cannot be opened: "
                               f"{exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                invalid(f"shared memory key {shown(key)} is not a shared memory object")
            if offset + byte_size > info.st_size:
                invalid(f"region {shown(name)}: offset {offset} + byte_size {byte_size} "
                        f"exceeds the {info.st_size} bytes of {shown(key)}")
            mapping = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, mapping, fd)

    def unregister(self, name: str = "") -> None:
        """One region, or every one when `name` is empty; an unknown name is no error
        (as in Triton)."""
        for region in [self._regions.pop(name, None)] if name else list(self._regions.values()):
            if region is not None:
                region.mapping.close()
                os.close(region.fd)
        if not name:
            self._regions.clear()

    def has(self, name: str) -> bool:
        return name in self._regions

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return sorted(self._regions.values(), key=lambda r: r.name)
        return [self._region(name)]

    def read(self, name: str, offset: int, byte_size: int, dtype: np.dtype,
             shape: tuple[int, ...]) -> np.ndarray:
        """The tensor at `offset` of region `name`, copied out."""
        region = self._window(name, offset, byte_size)
        count = byte_size // dtype.itemsize
        if count * dtype.itemsize != byte_size or count != int(np.prod(shape, dtype=np.int64)):
            invalid(f"region {shown(name)}: {byte_size} bytes do not hold a {dtype.name} "
                    f"tensor of shape {list(shape)}")
        self._still_covers(region, offset + byte_size)
        return np.frombuffer(region.mapping, dtype=dtype, count=count,
                             offset=region.offset + offset).reshape(shape).copy()

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray) -> int:
        """Copy `array` (contiguous, in the dtype the client expects) to `offset` of region
        `name`; returns the bytes written."""
        region = self._window(name, offset, byte_size)
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if data.size > byte_size:
            invalid(f"region {shown(name)}: the output needs {data.size} bytes, the request "
                    f"gave {byte_size}")
        self._still_covers(region, offset + data.size)
        np.frombuffer(region.mapping, np.uint8, data.size, region.offset + offset)[:] = data
        return int(data.size)

    @staticmethod
    def _still_covers(region: Region, end: int) -> None:
        size = os.fstat(region.fd).st_size
        if region.offset + end > min(size, len(region.mapping)):
            invalid(f"region {shown(region.name)}: its object {shown(region.key)} shrank to "
                    f"{size} bytes after it was registered")

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise ServingError(Status.NOT_FOUND,
                               f"no shared memory region {shown(name)} is registered")
        return region

    def _window(self, name: str, offset: int, byte_size: int) -> Region:
        region = self._region(name)
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            invalid(f"region {shown(name)} holds {region.byte_size} bytes; offset {offset} + "
                    f"byte_size {byte_size} lies outside it")
        return region
