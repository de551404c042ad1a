"""Drive a server with KServe's own SDK and print what it got, as JSON.

Run in a subprocess: the kserve package registers the protocol's gRPC messages under the
same names as tritonclient and this project, and protobuf refuses both in one process.
Usage: python -m tests.service.kserve_sdk HTTP_URL GRPC_ADDRESS MODEL INPUT.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)
from kserve.protocol.rest.v2_datamodels import (
    InferenceResponse,
    ModelMetadataResponse,
    ServerMetadataResponse,
)


async def rest(url: str, model: str, x: np.ndarray) -> dict[str, object]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    got: dict[str, object] = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, model),
        "missing_model_ready": await client.is_model_ready(url, "no-such-model"),
    }
    for binary in (True, False):
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        answer = await client.infer(url, InferRequest(model, [tensor], request_id="k-1"),
                                    model_name=model)
        got[f"infer_{'binary' if binary else 'json'}"] = {
            "id": answer.id, "outputs": {o.name: o.as_numpy().tolist() for o in answer.outputs}}
    try:
        await client.infer(url, {"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                             "data": [0.0]}]}, model_name="no-such-model")
    except httpx.HTTPStatusError as exc:
        got["missing_model_infer"] = [exc.response.status_code, str(exc)]
    await client.close()
    # The SDK has no metadata call; its server's own response models check ours.
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        ServerMetadataResponse.model_validate((await http.get("/v2")).json())
        meta = ModelMetadataResponse.model_validate(
            (await http.get(f"/v2/models/{model}")).json())
        got["metadata"] = meta.model_dump(mode="json", exclude_none=True)
        answer_json = (await http.post(f"/v2/models/{model}/infer", json={
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]})).json()
        InferenceResponse.model_validate(answer_json)
    return got


async def grpc(address: str, model: str, x: np.ndarray) -> dict[str, object]:
    async with InferenceGRPCClient(address, timeout=30) as client:
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = await client.infer(InferRequest(model, [tensor], request_id="g-1"))
        return {"ready": await client.is_server_ready(),
                "model_ready": await client.is_model_ready(model),
                "infer": {"id": answer.id,
                          "outputs": {o.name: o.as_numpy().tolist() for o in answer.outputs}}}


async def main(url: str, address: str, model: str, x: np.ndarray) -> None:
    print(json.dumps({"rest": await rest(url, model, x), "grpc": await grpc(address, model, x)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], np.load(sys.argv[4])))
