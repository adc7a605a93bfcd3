"""The baseline of bench/serving.py: what a user would write by hand to serve an ONNX model over HTTP.

FastAPI + pydantic models of the Open Inference Protocol's JSON request, one onnxruntime call per request,
JSON tensors both ways. Run under uvicorn as its own process (uvicorn picks up httptools and uvloop when
installed, as they are with strata's server extras):

    STRATA_BASELINE_MODEL=model.onnx uvicorn --app-dir bench baseline_server:app --port 8000 --log-level warning

STRATA_BASELINE_ASYNC=1 makes the endpoint `async def` (the run happens on the event loop, no thread hop),
otherwise it is a plain `def` that FastAPI runs in its thread pool; STRATA_BASELINE_SPIN=0 turns off
onnxruntime's spinning pool threads (what strata's agent does). bench/serving.py tries the variants and uses
the fastest as the baseline.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
OIP_TYPES = {np.dtype(v): k for k, v in DTYPES.items()}

options = ort.SessionOptions()
if os.environ.get("STRATA_BASELINE_SPIN") == "0":  # onnxruntime's pool threads sleep instead of spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(os.environ["STRATA_BASELINE_MODEL"], options, providers=["CPUExecutionProvider"])
app = FastAPI()


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | list[int]


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


def infer(name: str, request: InferenceRequest) -> dict[str, Any]:
    feeds = {t.name: np.asarray(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs}
    results = session.run(None, feeds)
    outputs = [
        {
            "name": meta.name,
            "datatype": OIP_TYPES[value.dtype],
            "shape": list(value.shape),
            "data": value.ravel().tolist(),
        }
        for meta, value in zip(session.get_outputs(), results, strict=True)
    ]
    return {"model_name": name, "outputs": outputs}


if os.environ.get("STRATA_BASELINE_ASYNC") == "1":

    @app.post("/v2/models/{name}/infer")
    async def infer_async(name: str, request: InferenceRequest) -> dict[str, Any]:
        return infer(name, request)

else:

    @app.post("/v2/models/{name}/infer")
    def infer_sync(name: str, request: InferenceRequest) -> dict[str, Any]:
        return infer(name, request)
