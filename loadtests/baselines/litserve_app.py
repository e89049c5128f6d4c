"""LitServe serving the same ONNX model: the peer `make bench` measures the service against.

Configured the way LitServe's documentation advises for throughput: batching in its inference worker
(`max_batch_size` 32, `batch_timeout` 5 ms), `fast_queue` (ZeroMQ between the HTTP process and the worker), one
worker on the CPU. `decode_request` calls our `serving.preprocess`, so the work per image is identical. Uploads are
multipart (field `image`): LitServe reads form or JSON bodies, not raw bytes.

    LIT_MODEL=alexnet python -m loadtests.baselines.litserve_app --port 3200
    curl -F image=@examples/grace_hopper.jpg http://127.0.0.1:3200/classify
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np

from serving.preprocess import preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, load_repository
from serving.runtime import top_k

MODEL = os.environ.get("LIT_MODEL", "alexnet")
BATCH = int(os.environ.get("LIT_MAX_BATCH", "32"))
TIMEOUT_S = float(os.environ.get("LIT_BATCH_TIMEOUT_S", "0.005"))
THREADS = int(os.environ.get("LIT_THREADS", "1"))
TOP_K = int(os.environ.get("LIT_TOP_K", "5"))


class ClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = load_repository(DEFAULT_MODELS_DIR, [MODEL], "cpu", THREADS)[MODEL]
        self.model.warm_up()

    def decode_request(self, request) -> np.ndarray:  # the parsed multipart form
        return preprocess_bytes(request["image"].file.read(), self.model.recipe)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.logits(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict:
        card = self.model.card
        return {"model": card.name, "version": card.version, "weights": card.weights,
                "predictions": top_k(logits[None], TOP_K, self.model.labels)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3200)
    args = parser.parse_args()
    api = ClassifierAPI(max_batch_size=BATCH, batch_timeout=TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
