"""Every registered region, system or CUDA, by name: what requests name."""

from __future__ import annotations

import numpy as np

from service.memory.cuda import CudaSharedMemoryRegistry, DeviceTensor
from service.memory.system import SharedMemoryRegistry
from service.status import ServingError, Status, shown


class Regions:
    """System and CUDA regions under one set of names, as requests name them (a name
    registered as one kind cannot be registered as the other)."""

    def __init__(self, system: SharedMemoryRegistry, cuda: CudaSharedMemoryRegistry) -> None:
        self.system = system
        self.cuda = cuda

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._unique(name, self.cuda)
        self.system.register(name, key, offset, byte_size)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int,
                      byte_size: int) -> None:
        self._unique(name, self.system)
        self.cuda.register(name, raw_handle, device_id, byte_size)

    def read(self, name: str, offset: int, byte_size: int, dtype: np.dtype,
             shape: tuple[int, ...]) -> np.ndarray | DeviceTensor:
        """A system region's tensor copied out; a CUDA region's left on its GPU."""
        return self._owner(name).read(name, offset, byte_size, dtype, shape)

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray) -> int:
        return self._owner(name).write(name, offset, byte_size, array)

    def check(self, name: str) -> None:
        """NOT_FOUND unless a region of either kind has this name."""
        self._owner(name).status(name)

    def close(self) -> None:
        self.system.unregister()
        self.cuda.unregister()

    def _owner(self, name: str) -> SharedMemoryRegistry | CudaSharedMemoryRegistry:
        """A dict lookup per named tensor, not a listing: this is on the request path."""
        return self.cuda if self.cuda.has(name) else self.system

    @staticmethod
    def _unique(name: str, other: SharedMemoryRegistry | CudaSharedMemoryRegistry) -> None:
        if other.has(name):
            raise ServingError(Status.ALREADY_EXISTS,
                               f"a shared memory region of the other kind is registered as "
                               f"{shown(name)}; unregister it first")
