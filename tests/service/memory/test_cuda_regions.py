"""CUDA shared memory through the server's real code, with a stand-in libcudart.

No GPU runs here, so a libcudart of five functions is compiled for the test: its "device
memory" is POSIX shared memory, an IPC handle carries the object's name, and cudaMemcpy
is memmove. The server finds it as it would find CUDA 13's, by soname on the library
path; everything above the five calls (registration over gRPC and REST, offsets, reads,
output writes, unregistering) is the server's own."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service.memory.cuda import CudaSharedMemoryRegistry, cudart_candidates
from tests.servers import ServerProcess

STANDIN = r"""
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
typedef struct { char reserved[64]; } cudaIpcMemHandle_t;
static struct { void *p; size_t n; } maps[256];
int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
int cudaSetDevice(int d) { return d == 0 ? 0 : 101; }
const char *cudaGetErrorString(int e) { return e == 101 ? "invalid device ordinal" : "error"; }
int cudaIpcOpenMemHandle(void **p, cudaIpcMemHandle_t h, unsigned flags) {
  char name[65]; struct stat st; void *m; int fd, i;
  memcpy(name, h.reserved, 64); name[64] = 0;
  if ((fd = shm_open(name, O_RDWR, 0)) < 0) return 201;
  fstat(fd, &st);
  m = mmap(0, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) return 2;
  for (i = 0; i < 256; i++) if (!maps[i].p) { maps[i].p = m; maps[i].n = st.st_size; break; }
  *p = m;
  return 0;
}
int cudaIpcCloseMemHandle(void *p) {
  for (int i = 0; i < 256; i++)
    if (maps[i].p == p) { munmap(p, maps[i].n); maps[i].p = 0; return 0; }
  return 400;
}
int cudaMemcpy(void *dst, const void *src, size_t n, int kind) { memmove(dst, src, n); return 0; }
"""
X = np.random.default_rng(5).standard_normal((3, 1, 28, 28)).astype(np.float32)
LOGITS_BYTES = 3 * 10 * 4


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the stand-in as libcudart.so.13."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in libcudart")
    folder = tmp_path_factory.mktemp("cudart")
    (folder / "standin.c").write_text(STANDIN)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(folder / "libcudart.so.13"),
                    str(folder / "standin.c"), "-lrt"], check=True, timeout=60)
    return folder


@pytest.fixture
def gpu_memory() -> Iterator[Callable[[int], tuple[shared_memory.SharedMemory, bytes]]]:
    """Stand-in device allocations: a buffer, and its IPC handle."""
    made: list[shared_memory.SharedMemory] = []

    def allocate(size: int) -> tuple[shared_memory.SharedMemory, bytes]:
        block = shared_memory.SharedMemory(create=True, size=size)
        made.append(block)
        return block, f"/{block.name}".encode().ljust(64, b"\0")

    yield allocate
    for block in made:
        block.close()
        block.unlink()


@pytest.fixture
def server(served_repo: Path, standin: Path,
           server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(served_repo, env={"LD_LIBRARY_PATH": str(standin)})


def expected_logits(repo: Path) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "lenet" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": X})[0])


def mapped(server: ServerProcess, block: shared_memory.SharedMemory) -> bool:
    return f"/dev/shm/{block.name}" in Path(f"/proc/{server.proc.pid}/maps").read_text()


def test_libcudart_is_looked_for_in_the_cuda_13_and_12_wheel_layouts(tmp_path: Path) -> None:
    for layout, name in (("nvidia/cu13/lib", "libcudart.so.13"),
                         ("nvidia/cuda_runtime/lib", "libcudart.so.12")):
        (tmp_path / layout).mkdir(parents=True)
        (tmp_path / layout / name).write_bytes(b"")
    candidates = cudart_candidates([str(tmp_path)])
    assert candidates[:2] == ["libcudart.so.13", "libcudart.so.12"]
    wheels = [c for c in candidates if c.startswith(str(tmp_path))]
    assert wheels == [str(tmp_path / "nvidia/cu13/lib/libcudart.so.13"),
                      str(tmp_path / "nvidia/cuda_runtime/lib/libcudart.so.12")]


def test_an_input_keeps_its_region_open_until_it_is_dropped(
        standin: Path, gpu_memory: Callable[[int], tuple[shared_memory.SharedMemory, bytes]]
        ) -> None:
    """A request's input stays in its region (no copy) until a batch needs it on the
    host; unregistering the region meanwhile closes it only once the input is gone."""
    registry = CudaSharedMemoryRegistry([str(standin / "libcudart.so.13")])
    block, handle = gpu_memory(X.nbytes)
    np.ndarray(X.shape, np.float32, block.buf)[:] = X
    registry.register("in", handle, 0, X.nbytes)
    tensor = registry.read("in", 0, X.nbytes, np.dtype(np.float32), X.shape)
    assert (tensor.shape, tensor.nbytes, tensor.device_id) == (X.shape, X.nbytes, 0)
    registry.unregister("in")

    def mappings() -> int:  # this process maps it once as the client, once as the server
        return Path("/proc/self/maps").read_text().count(f"/dev/shm/{block.name}")

    assert mappings() == 2
    np.testing.assert_array_equal(np.asarray(tensor), X)
    del tensor
    assert mappings() == 1


def test_the_extension_is_advertised_only_where_libcudart_shows_a_gpu(standin: Path) -> None:
    assert CudaSharedMemoryRegistry([str(standin / "libcudart.so.13")]).available()
    assert not CudaSharedMemoryRegistry([str(standin / "libcudart.so.missing")]).available()


def test_tensors_travel_through_cuda_regions_over_grpc(
        server: ServerProcess, served_repo: Path,
        gpu_memory: Callable[[int], tuple[shared_memory.SharedMemory, bytes]]) -> None:
    client = triton.InferenceServerClient(server.address)
    assert "cuda_shared_memory" in client.get_server_metadata().extensions
    source, source_handle = gpu_memory(64 + X.nbytes)
    target, target_handle = gpu_memory(8 + LOGITS_BYTES)
    np.ndarray(X.shape, np.float32, source.buf, offset=64)[:] = X
    client.register_cuda_shared_memory("in", base64.b64encode(source_handle), 0, source.size)
    client.register_cuda_shared_memory("out", base64.b64encode(target_handle), 0, target.size)
    assert {r.name: r.byte_size for r in client.get_cuda_shared_memory_status().regions
            .values()} == {"in": source.size, "out": target.size}
    tensor = triton.InferInput("input", list(X.shape), "FP32")
    tensor.set_shared_memory("in", X.nbytes, offset=64)
    wanted = triton.InferRequestedOutput("logits")
    wanted.set_shared_memory("out", LOGITS_BYTES, offset=8)
    client.infer("lenet", [tensor], outputs=[wanted])
    written = np.ndarray((3, 10), np.float32, target.buf, offset=8).copy()
    np.testing.assert_allclose(written, expected_logits(served_repo), rtol=1e-5, atol=1e-5)
    short = triton.InferRequestedOutput("logits")
    short.set_shared_memory("out", LOGITS_BYTES, offset=16)
    with pytest.raises(InferenceServerException, match="lies outside it"):
        client.infer("lenet", [tensor], outputs=[short])
    with pytest.raises(InferenceServerException, match="not one of this server's 1 GPUs"):
        client.register_cuda_shared_memory("other", base64.b64encode(source_handle), 1, 64)

    assert mapped(server, source)
    client.unregister_cuda_shared_memory("in")
    assert not mapped(server, source) and mapped(server, target)
    with pytest.raises(InferenceServerException, match="region 'in' is registered"):
        client.infer("lenet", [tensor], outputs=[wanted])
    client.unregister_cuda_shared_memory()
    assert not client.get_cuda_shared_memory_status().regions
    assert not mapped(server, target)
    assert server.terminate() == 0


def _post(server: ServerProcess, path: str, doc: object) -> dict[str, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}",
                                     json.dumps(doc).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


def test_tensors_travel_through_cuda_regions_over_rest(
        server: ServerProcess, served_repo: Path,
        gpu_memory: Callable[[int], tuple[shared_memory.SharedMemory, bytes]]) -> None:
    source, source_handle = gpu_memory(X.nbytes)
    target, target_handle = gpu_memory(LOGITS_BYTES)
    np.ndarray(X.shape, np.float32, source.buf)[:] = X
    for name, handle, size in (("rin", source_handle, source.size),
                               ("rout", target_handle, target.size)):
        _post(server, f"/v2/cudasharedmemory/region/{name}/register",
              {"raw_handle": {"b64": base64.b64encode(handle).decode()}, "device_id": 0,
               "byte_size": size})
    answer = _post(server, "/v2/models/lenet/infer", {
        "inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32",
                    "parameters": {"shared_memory_region": "rin",
                                   "shared_memory_byte_size": X.nbytes}}],
        "outputs": [{"name": "logits",
                     "parameters": {"shared_memory_region": "rout",
                                    "shared_memory_byte_size": LOGITS_BYTES}}]})
    assert answer["outputs"][0]["parameters"]["shared_memory_region"] == "rout"  # type: ignore[index]
    np.testing.assert_allclose(np.ndarray((3, 10), np.float32, target.buf).copy(),
                               expected_logits(served_repo), rtol=1e-5, atol=1e-5)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}"
                                "/v2/cudasharedmemory/status", timeout=10) as response:
        assert {r["name"] for r in json.loads(response.read())} == {"rin", "rout"}
    _post(server, "/v2/cudasharedmemory/unregister", {})
    assert not mapped(server, source) and not mapped(server, target)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _post(server, "/v2/cudasharedmemory/region/bad/register",
              {"raw_handle": {"b64": base64.b64encode(b"short").decode()}, "byte_size": 8})
    assert refused.value.code == 400
    assert server.terminate() == 0
