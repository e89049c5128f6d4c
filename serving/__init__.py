"""Inference side of convnet-serving: no torch here, only numpy, Pillow and onnxruntime."""

import os

# Nothing phones home, whichever entry point imports us first (service, batch CLI, tests).
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
