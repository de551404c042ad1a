"""CUDA shared memory regions clients register, as Triton's extension has them.

A client allocates GPU memory, exports it as a CUDA IPC handle and registers it under a
name; requests then name the region instead of carrying tensor bytes. The server opens
the handle with the CUDA runtime (libcudart, through ctypes: no CUDA Python package
needed). Inputs stay in it until a session binds them in place or a batch copies them
out; outputs are copied into it. On a host without a GPU every registration is refused
with FAILED_PRECONDITION, saying why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.memory.system import check_new_region
from service.status import ServingError, Status, invalid, shown

_IPC_HANDLE_BYTES = 64
_LAZY_PEER_ACCESS = 1
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _IPC_HANDLE_BYTES)]

    @classmethod
    def of(cls, raw: bytes) -> _IpcHandle:
        """All 64 bytes, NULs included (a c_char field would stop at the first)."""
        return cls.from_buffer_copy(raw)


def cudart_candidates(site_paths: list[str] | None = None) -> list[str]:
    """Where libcudart may be, newest CUDA first: by soname on the library path (a system
    or CUDA-image install), then in the nvidia-* wheels under `site_paths` (sys.path by
    default): CUDA 13's `nvidia/cu13/lib`, CUDA 12's `nvidia/cuda_runtime/lib`."""
    names = ["libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart") or "",
             "libcudart.so"]
    for root in sys.path if site_paths is None else site_paths:
        for layout in ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib"):
            names += sorted(glob.glob(os.path.join(root, layout, "libcudart.so.*[0-9]")),
                            reverse=True)
    return list(dict.fromkeys(n for n in names if n))


def _load_cudart(candidates: list[str] | None = None) -> ctypes.CDLL | None:
    """The first libcudart of `candidates` that loads; None if none does."""
    for name in cudart_candidates() if candidates is None else candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle,
                                             ctypes.c_uint]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.c_int]
        lib.cudaSetDevice.argtypes = [ctypes.c_int]
        lib.cudaGetDeviceCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        return lib
    return None


class DeviceTensor:
    """An input that stays where the client put it, in GPU memory, until it is needed:
    a session on that GPU binds `pointer` in place when the tensor is a batch by itself;
    a batch of several, or a session on the CPU, copies it to host memory once through
    `__array__`. `release` runs when the tensor is dropped (a request answered, refused
    or expired), never before."""

    def __init__(self, pointer: int, device_id: int, dtype: np.dtype,
                 shape: tuple[int, ...], to_host: Callable[[], np.ndarray],
                 release: Callable[[], None] | None = None, device: str = "cuda") -> None:
        self.pointer, self.device_id, self.device = pointer, device_id, device
        self.dtype, self.shape = np.dtype(dtype), shape
        self._to_host = to_host
        self._host: np.ndarray | None = None
        if release is not None:
            weakref.finalize(self, release)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None
                  ) -> np.ndarray:
        if self._host is None:
            self._host = self._to_host()
        return self._host if dtype is None else np.asarray(self._host, dtype)


@dataclass
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    pointer: int
    copies: int = 0
    """Copies in progress: the handle is closed only once they are done."""
    closing: bool = False


class CudaSharedMemoryRegistry:
    """Registered regions by name. Copies run in parallel, each on its own thread's
    current device; a lock guards only the table, so an unregister never unmaps memory a
    copy is still using."""

    def __init__(self, candidates: list[str] | None = None) -> None:
        self._regions: dict[str, CudaRegion] = {}
        self._candidates = candidates
        self._cudart: ctypes.CDLL | None = None
        self._looked = False
        self._lock = threading.Lock()  # the table and each region's count

    def available(self) -> bool:
        """libcudart loads and shows at least one GPU: only then is the extension
        advertised."""
        with contextlib.suppress(ServingError):
            cudart = self._runtime()
            count = ctypes.c_int(0)
            return cudart.cudaGetDeviceCount(ctypes.byref(count)) == 0 and count.value > 0
        return False

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        cudart = self._runtime()
        check_new_region("CUDA shared memory", name, self._regions)
        if len(raw_handle) != _IPC_HANDLE_BYTES:
            invalid(f"raw_handle must be a {_IPC_HANDLE_BYTES}-byte cudaIpcMemHandle_t, got "
                    f"{len(raw_handle)} bytes")
        count = ctypes.c_int(0)
        code = cudart.cudaGetDeviceCount(ctypes.byref(count))
        if code != 0 or count.value == 0:
            raise ServingError(Status.FAILED_PRECONDITION,
                               "CUDA shared memory needs a GPU, and the CUDA runtime finds "
                               f"none here ({self._error(code)}); use system shared memory")
        if not 0 <= device_id < count.value:
            invalid(f"device_id {device_id} is not one of this server's {count.value} GPUs")
        if byte_size < 1:
            invalid("byte_size must be at least 1")
        pointer = ctypes.c_void_p()
        self._check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._check(cudart.cudaIpcOpenMemHandle(
            ctypes.byref(pointer), _IpcHandle.of(raw_handle), _LAZY_PEER_ACCESS),
            "cudaIpcOpenMemHandle")
        assert pointer.value is not None
        region = CudaRegion(name, device_id, byte_size, pointer.value)
        with self._lock:
            if name not in self._regions:
                self._regions[name] = region
                return
        self._close(region)  # another registration of this name won the race
        check_new_region("CUDA shared memory", name, self._regions)

    def unregister(self, name: str = "") -> None:
        """One region, or every one when `name` is empty; an unknown name is no error.
        A region still being copied is closed when its last copy ends."""
        with self._lock:
            gone = [self._regions.pop(n) for n in ([name] if name else list(self._regions))
                    if n in self._regions]
            idle = [r for r in gone if r.copies == 0]
            for region in gone:
                region.closing = True
        for region in idle:
            self._close(region)

    def has(self, name: str) -> bool:
        return name in self._regions

    def status(self, name: str = "") -> list[CudaRegion]:
        if not name:
            return sorted(self._regions.values(), key=lambda r: r.name)
        return [self._window(name, 0, 0)]

    def read(self, name: str, offset: int, byte_size: int, dtype: np.dtype,
             shape: tuple[int, ...]) -> DeviceTensor:
        """The tensor at `offset` of region `name`, left on its GPU: a session there binds
        it in place, anything else copies it to host memory once (`np.asarray`). The
        region stays open while the tensor lives."""
        if np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)) != byte_size:
            self._window(name, offset, byte_size)
            invalid(f"region {shown(name)}: {byte_size} bytes do not hold a {dtype.name} "
                    f"tensor of shape {list(shape)}")
        region = self._lease(name, offset, byte_size)

        def to_host() -> np.ndarray:
            out = np.empty(shape, dtype)
            self._transfer(region, out.ctypes.data, region.pointer + offset, byte_size,
                           _DEVICE_TO_HOST)
            return out

        return DeviceTensor(region.pointer + offset, region.device_id, dtype, shape, to_host,
                            functools.partial(self._release, region))

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray) -> int:
        data = np.ascontiguousarray(array)
        if data.nbytes > byte_size:
            self._window(name, offset, byte_size)
            invalid(f"region {shown(name)}: the output needs {data.nbytes} bytes, the request "
                    f"gave {byte_size}")
        region = self._lease(name, offset, data.nbytes)
        try:
            self._transfer(region, region.pointer + offset, data.ctypes.data, data.nbytes,
                           _HOST_TO_DEVICE)
        finally:
            self._release(region)
        return int(data.nbytes)

    def _lease(self, name: str, offset: int, nbytes: int) -> CudaRegion:
        """The region, held open until `_release`."""
        with self._lock:
            region = self._window(name, offset, nbytes)
            region.copies += 1
        return region

    def _release(self, region: CudaRegion) -> None:
        with self._lock:
            region.copies -= 1
            last = region.closing and region.copies == 0
        if last:
            self._close(region)

    def _transfer(self, region: CudaRegion, dst: int, src: int, nbytes: int,
                  kind: int) -> None:
        assert self._cudart is not None  # a registered region means the runtime loaded
        self._check(self._cudart.cudaSetDevice(region.device_id), "cudaSetDevice")
        self._check(self._cudart.cudaMemcpy(dst, src, nbytes, kind), "cudaMemcpy")

    def _close(self, region: CudaRegion) -> None:
        assert self._cudart is not None
        self._cudart.cudaSetDevice(region.device_id)
        self._cudart.cudaIpcCloseMemHandle(ctypes.c_void_p(region.pointer))

    def _window(self, name: str, offset: int, byte_size: int) -> CudaRegion:
        region = self._regions.get(name)
        if region is None:
            raise ServingError(Status.NOT_FOUND,
                               f"no CUDA shared memory region {shown(name)} is registered")
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            invalid(f"region {shown(name)} holds {region.byte_size} bytes; offset {offset} + "
                    f"byte_size {byte_size} lies outside it")
        return region

    def _runtime(self) -> ctypes.CDLL:
        if not self._looked:
            self._cudart, self._looked = _load_cudart(self._candidates), True
        if self._cudart is None:
            raise ServingError(Status.FAILED_PRECONDITION,
                               "CUDA shared memory needs a GPU and the CUDA runtime "
                               "(libcudart), which this server does not have; use system "
                               "shared memory")
        return self._cudart

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            status = Status.FAILED_PRECONDITION if call == "cudaSetDevice" else \
                Status.INVALID_ARGUMENT
            raise ServingError(status, f"{call} failed: {self._error(code)}")

    def _error(self, code: int) -> str:
        assert self._cudart is not None
        text = (self._cudart.cudaGetErrorString(code) or b"").decode(errors="replace")
        return f"{text}, error {code}"
