"""CUDA shared memory regions clients register, as Triton's extension has them.

A client allocates GPU memory, exports it as a CUDA IPC handle and registers it under a
name; requests then name the region instead of carrying tensor bytes. The server opens
the handle with the CUDA runtime (libcudart, through ctypes: no CUDA Python package
needed) and copies inputs out of it and outputs into it. On a host without a GPU every
registration is refused with FAILED_PRECONDITION, saying why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
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


def _load_cudart() -> ctypes.CDLL | None:
    """libcudart from the system or from the nvidia-cuda-runtime wheel; None if absent."""
    candidates = [ctypes.util.find_library("cudart"), "libcudart.so.12", "libcudart.so"]
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]

        for folder in nvidia.cuda_runtime.__path__:
            candidates += sorted(glob.glob(os.path.join(folder, "lib", "libcudart.so*")))
    except ImportError:
        pass
    for name in candidates:
        if not name:
            continue
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


@dataclass(frozen=True)
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    pointer: int


class CudaSharedMemoryRegistry:
    def __init__(self) -> None:
        self._regions: dict[str, CudaRegion] = {}
        self._cudart: ctypes.CDLL | None = None
        self._looked = False
        self._lock = threading.Lock()  # reads and writes come from decode threads too

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
        with self._lock:
            self._check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
            self._check(cudart.cudaIpcOpenMemHandle(
                ctypes.byref(pointer), _IpcHandle.of(raw_handle), _LAZY_PEER_ACCESS),
                "cudaIpcOpenMemHandle")
        assert pointer.value is not None
        self._regions[name] = CudaRegion(name, device_id, byte_size, pointer.value)

    def unregister(self, name: str = "") -> None:
        """One region, or every one when `name` is empty; an unknown name is no error."""
        names = [name] if name else list(self._regions)
        for gone in names:
            region = self._regions.pop(gone, None)
            if region is not None and self._cudart is not None:
                with self._lock:
                    self._cudart.cudaSetDevice(region.device_id)
                    self._cudart.cudaIpcCloseMemHandle(ctypes.c_void_p(region.pointer))

    def has(self, name: str) -> bool:
        return name in self._regions

    def status(self, name: str = "") -> list[CudaRegion]:
        if not name:
            return sorted(self._regions.values(), key=lambda r: r.name)
        return [self._window(name, 0, 0)]

    def read(self, name: str, offset: int, byte_size: int, dtype: np.dtype,
             shape: tuple[int, ...]) -> np.ndarray:
        """The tensor at `offset` of region `name`, copied to host memory."""
        region = self._window(name, offset, byte_size)
        out = np.empty(shape, dtype)
        if out.nbytes != byte_size:
            invalid(f"region {shown(name)}: {byte_size} bytes do not hold a {dtype.name} "
                    f"tensor of shape {list(shape)}")
        self._copy(region, out.ctypes.data, region.pointer + offset, byte_size, _DEVICE_TO_HOST)
        return out

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray) -> int:
        region = self._window(name, offset, byte_size)
        data = np.ascontiguousarray(array)
        if data.nbytes > byte_size:
            invalid(f"region {shown(name)}: the output needs {data.nbytes} bytes, the request "
                    f"gave {byte_size}")
        self._copy(region, region.pointer + offset, data.ctypes.data, data.nbytes,
                   _HOST_TO_DEVICE)
        return int(data.nbytes)

    def _copy(self, region: CudaRegion, dst: int, src: int, nbytes: int, kind: int) -> None:
        assert self._cudart is not None  # a registered region means the runtime loaded
        with self._lock:
            self._check(self._cudart.cudaSetDevice(region.device_id), "cudaSetDevice")
            self._check(self._cudart.cudaMemcpy(dst, src, nbytes, kind), "cudaMemcpy")

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
            self._cudart, self._looked = _load_cudart(), True
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
