"""The alternative architecture, kept for the measurement in scripts/measure_service.py: ONE BentoML service whose
per-model batchable endpoints are called by its own mounted front end through BentoML's in-process self-client
(`self.to_async`), instead of a separate model service reached with `bentoml.depends` (serving/service.py).

    bentoml serve scripts.single_service:ConvnetSingle
"""

from __future__ import annotations

import bentoml
import numpy as np

from serving.api import ClassifierAPI, Metrics
from serving.service import (
    CFG,
    MODEL_INFOS,
    MODEL_WORKERS,
    RUNNER_CONNECTION,
    USES_GPU,
    OpenAPIPaths,
    _logits_endpoint,
    _ModelWorker,
    endpoint_name,
)

API = ClassifierAPI(CFG, MODEL_INFOS)


def _init(self) -> None:
    _ModelWorker.__init__(self)
    API.attach(self._infer, self._describe, Metrics())


async def _infer(self, model: str, batch: np.ndarray) -> np.ndarray:
    return await getattr(self.to_async, endpoint_name(model))(batch)


async def _describe(self) -> list[dict]:
    return [m.describe() for m in self.models.values()]


_namespace = {endpoint_name(n): _logits_endpoint(n) for n in MODEL_INFOS}
_namespace.update(__init__=_init, _infer=_infer, _describe=_describe, served=list(MODEL_INFOS))
ConvnetSingle = bentoml.asgi_app(API.app(), path="/")(bentoml.service(
    name="convnet_single", workers=MODEL_WORKERS, threads=1, traffic={"timeout": CFG.timeout_s},
    resources={"gpu": 1} if USES_GPU else {}, runner_connection=RUNNER_CONNECTION,
)(type("ConvnetSingle", (_ModelWorker,), _namespace)))
ConvnetSingle.add_asgi_middleware(OpenAPIPaths, service=ConvnetSingle, paths=API.openapi_paths())
