"""The Open Inference Protocol (KServe v2 / Triton REST) over real HTTP: the real `tritonclient.http` client and raw
requests against a real `bentoml serve` (conftest's `server`), real ONNX models, real photos and digits.

Every inference answer is checked against /classify on the same image: the v2 path must give the same numbers.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import re
import struct
import time
from pathlib import Path

import httpx
import imagegen
import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format, text_format
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from triton_pb2 import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from serving.preprocess import preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, read_card
from serving.runtime import softmax

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PHOTO = (EXAMPLES / "grace_hopper.jpg").read_bytes()
DIGIT = (EXAMPLES / "digit-7.png").read_bytes()
IMAGE_FOR = {"alexnet": PHOTO, "lenet5": DIGIT}
SHAPE_FOR = {"alexnet": [224, 224, 3], "lenet5": [32, 32, 1]}
CLASSES_FOR = {"alexnet": 1000, "lenet5": 10}


def client(server: str, concurrency: int = 1) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.removeprefix("http://"), concurrency=concurrency,
                                        connection_timeout=60, network_timeout=60)


def pixels(model: str, *images: bytes) -> np.ndarray:
    """What a Triton user sends: the images preprocessed client-side with the card's recipe."""
    recipe = read_card(DEFAULT_MODELS_DIR / model).recipe
    return np.stack([preprocess_bytes(im, recipe) for im in images])


def pixel_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    return triton.InferInput("image", list(x.shape), "UINT8").set_data_from_numpy(x, binary_data=binary)


def bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    """Raw files in binary; in JSON, which can't carry raw bytes, base64 strings."""
    data = np.array(images if binary else [base64.b64encode(im) for im in images], dtype=np.object_)
    return triton.InferInput("image_bytes", [len(images)], "BYTES").set_data_from_numpy(data, binary_data=binary)


def classify(server: str, image: bytes, model: str, k: int = 5) -> list[dict]:
    r = httpx.post(f"{server}/classify", params={"model": model, "top_k": k},
                   files={"image": ("upload", image, "application/octet-stream")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def assert_same_as_classify(logits_row: np.ndarray, predictions: list[dict]) -> None:
    """The logits give /classify's probabilities for its classes, and those classes are the top k. (Near-tied
    untrained-AlexNet scores may swap order across batch sizes, so order is compared through the values.)"""
    probs = softmax(logits_row[None])[0]
    for p in predictions:
        assert probs[p["index"]] == pytest.approx(p["score"], rel=1e-4, abs=1e-7), p
    kth_best = np.sort(probs)[-len(predictions)]
    assert min(p["score"] for p in predictions) >= kth_best - 1e-6


def v2_post(server: str, model: str, header: dict, binary: bytes = b"", header_length: int | str | None = None,
            **kw) -> httpx.Response:
    body = json.dumps(header).encode()
    headers = kw.pop("headers", {})
    if binary or header_length is not None:
        headers["Inference-Header-Content-Length"] = str(len(body) if header_length is None else header_length)
    return httpx.post(f"{server}/v2/models/{model}/infer", content=body + binary, headers=headers, timeout=60, **kw)


def assert_v2_error(r: httpx.Response, status: int, message_has: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert message_has.lower() in body["error"].lower(), body
    return body["error"]


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def batch_rows(server: str, model: str) -> tuple[float, float]:
    """(onnxruntime calls, rows run) by the service's micro-batcher for `model`: convnet_batch_size's count, sum."""
    text = httpx.get(f"{server}/metrics", timeout=10).text
    return tuple(sum(float(v) for v in re.findall(rf'^convnet_batch_size_{stat}\{{model="{model}"\}} ([0-9.e+-]+)$',
                                                  text, re.M)) for stat in ("count", "sum"))


# ---- server and model metadata, health ----------------------------------------------------------------------------


def test_server_metadata_and_health(server):
    c = client(server)
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "convnet-serving" and meta["version"]
    assert set(meta["extensions"]) == {"binary_tensor_data", "classification", "model_configuration", "statistics"}
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = httpx.get(f"{server}{path}", timeout=10)
        assert r.status_code == 200 and r.content == b""


@pytest.mark.parametrize("model", ["alexnet", "lenet5"])
def test_model_metadata_and_readiness(server, model):
    c = client(server)
    card = read_card(DEFAULT_MODELS_DIR / model)
    for version in ("", card.version):
        meta = c.get_model_metadata(model, model_version=version)
        assert meta["name"] == model and meta["versions"] == [card.version]
        assert meta["platform"] == "onnxruntime_onnx"
        inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
        assert inputs == {"image": ("UINT8", [-1, *SHAPE_FOR[model]]), "image_bytes": ("BYTES", [-1])}
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
            ("logits", "FP32", [-1, CLASSES_FOR[model]])]
        assert c.is_model_ready(model, model_version=version)


@pytest.mark.parametrize("model", ["alexnet", "lenet5"])
def test_model_configuration_is_the_repositorys_config_pbtxt(server, model):
    """The model configuration extension through tritonclient's get_model_config: the same ModelConfig message as
    models/<model>/config.pbtxt (both parsed by Triton's own message class, which refuses an unknown field), so a
    client that sizes its batches or reads the input's layout from it learns what a Triton serving the same
    repository would tell it."""
    pb2 = model_config_pb2()
    shipped = text_format.Parse((DEFAULT_MODELS_DIR / model / "config.pbtxt").read_text(), pb2.ModelConfig())
    c = client(server)
    for version in ("", "1"):
        served = c.get_model_config(model, model_version=version)
        assert json_format.ParseDict(served, pb2.ModelConfig()) == shipped
    assert served["max_batch_size"] == 64  # CONVNET_MAX_BATCH_IMAGES' default (test_service_lifecycle sets 3)
    [tensor] = served["input"]
    assert (tensor["name"], tensor["data_type"], tensor["format"]) == ("image", "TYPE_UINT8", "FORMAT_NHWC")
    assert tensor["dims"] == SHAPE_FOR[model] and served["output"][0]["dims"] == [CLASSES_FOR[model]]
    with pytest.raises(InferenceServerException) as e:
        c.get_model_config(model, model_version="2")
    assert e.value.status() == "404" and "no version '2'" in e.value.message()
    assert_v2_error(httpx.get(f"{server}/v2/models/resnet50/config", timeout=10), 404, "unknown model 'resnet50'")


def test_unknown_model_or_version_is_404(server):
    c = client(server)
    assert not c.is_model_ready("resnet50") and not c.is_model_ready("alexnet", model_version="2")
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("resnet50")
    assert e.value.status() == "404" and "unknown model 'resnet50'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.infer("alexnet", [pixel_input(pixels("alexnet", PHOTO), True)], model_version="7")
    assert e.value.status() == "404" and "no version '7'" in e.value.message()
    assert_v2_error(httpx.get(f"{server}/v2/models/nope/ready", timeout=10), 404, "unknown model 'nope'")


def model_stat(server: str, model: str, **kw) -> dict:
    """What tritonclient's get_inference_statistics says of one model; strictly Triton's ModelStatisticsResponse."""
    stats = client(server).get_inference_statistics(model, **kw)
    json_format.ParseDict(stats, service_pb2().ModelStatisticsResponse())  # refuses unknown fields and wrong types
    (stat,) = stats["model_stats"]
    return stat


def test_statistics_count_the_requests_of_every_worker_in_tritons_terms(server):
    """Statistics extension: what a request adds, read back by tritonclient. Each request goes on a new connection,
    so they land on whichever front worker takes it, and the counts are every worker's (from /metrics' registry)."""
    before, t0 = model_stat(server, "lenet5"), time.time()
    client(server).infer("lenet5", [pixel_input(pixels("lenet5", DIGIT, DIGIT, DIGIT), binary=True)])
    classify(server, DIGIT, "lenet5")
    bad = httpx.post(f"{server}/classify", params={"model": "lenet5"}, timeout=30,
                     files={"image": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 400, bad.text
    after, t1 = model_stat(server, "lenet5", model_version="1"), time.time()

    def grew(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return a - b

    assert (after["name"], after["version"]) == ("lenet5", "1")
    assert grew("inference_count") == 4 and grew("execution_count") == 2  # images; onnxruntime calls: 3 rows, 1 row
    assert grew("inference_stats", "success", "count") == 2 and grew("inference_stats", "fail", "count") == 1
    assert grew("inference_stats", "fail", "ns") > 0
    phases = ("queue", "compute_input", "compute_infer", "compute_output")
    for phase in phases:  # per request, as Triton counts them: two requests answered by two calls
        assert grew("inference_stats", phase, "count") == 2, phase
    assert grew("inference_stats", "compute_infer", "ns") > 0
    # A request's wait and its batch's compute happen within its time from headers to answer.
    assert sum(grew("inference_stats", phase, "ns") for phase in phases) < grew("inference_stats", "success", "ns")
    calls = {s["batch_size"]: s["compute_infer"]["count"] for s in after["batch_stats"]}
    calls_before = {s["batch_size"]: s["compute_infer"]["count"] for s in before["batch_stats"]}
    assert calls[3] - calls_before.get(3, 0) == 1 and calls[1] - calls_before.get(1, 0) == 1
    assert all(s["compute_input"]["count"] == s["compute_infer"]["count"] for s in after["batch_stats"])
    assert int(t0 * 1000) <= after["last_inference"] <= t1 * 1000
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}  # there is no response cache


def test_statistics_of_every_model_and_unknown_ones(server):
    stats = client(server).get_inference_statistics()
    json_format.ParseDict(stats, service_pb2().ModelStatisticsResponse())
    assert [(s["name"], s["version"]) for s in stats["model_stats"]] == [("alexnet", "1"), ("lenet5", "1")]
    c = client(server)
    for kw, message in (({"model_name": "resnet50"}, "unknown model 'resnet50'"),
                        ({"model_name": "lenet5", "model_version": "2"}, "no version '2'")):
        with pytest.raises(InferenceServerException) as e:
            c.get_inference_statistics(**kw)
        assert e.value.status() == "404" and message in e.value.message()


def test_unsupported_protocol_parts_are_named(server):
    r = httpx.post(f"{server}/v2/repository/index", timeout=10)
    assert_v2_error(r, 404, "not GRPC, shared memory, model repository control")
    with pytest.raises(InferenceServerException) as e:
        client(server).get_trace_settings()
    assert e.value.status() == "404" and "not GRPC" in e.value.message() and "tracing" in e.value.message()


def test_a_served_path_with_the_wrong_method_is_405_with_allow(server):
    r = httpx.get(f"{server}/v2/models/lenet5/infer", timeout=10)
    assert_v2_error(r, 405, "GET /v2/models/lenet5/infer: method not allowed; use POST")
    assert r.headers["allow"] == "POST"
    r = httpx.post(f"{server}/v2/models/lenet5/versions/1/ready", timeout=10)
    assert_v2_error(r, 405, "use GET, HEAD")
    assert r.headers["allow"] == "GET, HEAD"
    assert_v2_error(httpx.delete(f"{server}/v2/health/live", timeout=10), 405, "use GET, HEAD")
    # Methods outside the catch-all's old list got Starlette's 405 listing that list, on paths where all were 404s.
    r = httpx.request("TRACE", f"{server}/v2/health/live", timeout=10)
    assert_v2_error(r, 405, "TRACE /v2/health/live: method not allowed; use GET, HEAD")
    assert r.headers["allow"] == "GET, HEAD"
    for method in ("TRACE", "PROPFIND"):
        r = httpx.request(method, f"{server}/v2/repository/index", timeout=10)
        assert_v2_error(r, 404, f"{method} /v2/repository/index is not served")
        assert "allow" not in r.headers


def test_a_trailing_slash_redirects_like_classify(server):
    """The catch-all under /v2 took every path, so Starlette's redirect of a trailing slash (which /classify/ gets)
    never happened and `/v2/models/lenet5/` was a 404 "not served". Now the same relative 307; a path that is not
    served without its slash either is still the 404."""
    for method, path, location in (("GET", "/v2/", "/v2"), ("GET", "/v2/health/ready/", "/v2/health/ready"),
                                   ("GET", "/v2/models/lenet5//", "/v2/models/lenet5"),
                                   ("POST", "/v2/models/lenet5/infer/?x=1", "/v2/models/lenet5/infer?x=1")):
        r = httpx.request(method, f"{server}{path}", headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 307 and r.headers["location"] == location, (path, r.status_code, r.headers)
    r = httpx.post(f"{server}/v2/models/lenet5/infer/", json={"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0] * 1024}]},
        follow_redirects=True, timeout=30)
    assert r.status_code == 200 and r.json()["model_name"] == "lenet5", r.text
    assert_v2_error(httpx.get(f"{server}/v2/repository/index/", timeout=10), 404, "is not served")


def test_docs_json_lists_the_v2_paths(server):
    paths = httpx.get(f"{server}/docs.json", timeout=10).json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}", "/v2/models/{model}/ready",
            "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer", "/v2/models/stats",
            "/v2/models/{model}/stats", "/v2/models/{model}/versions/{version}/stats"} <= set(paths)
    assert "post" in paths["/v2/models/{model}/infer"]


# ---- inference: both input forms, JSON and binary, equal to /classify ---------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["alexnet", "lenet5"])
def test_uint8_tensor_matches_classify(server, model, binary):
    image = IMAGE_FOR[model]
    result = client(server).infer(model, [pixel_input(pixels(model, image), binary)],
                                  outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (1, CLASSES_FOR[model])
    assert_same_as_classify(logits[0], classify(server, image, model))
    if model == "lenet5":
        assert int(np.argmax(logits[0])) == 7  # a real, trained classifier on a real MNIST 7


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
@pytest.mark.parametrize("model", ["alexnet", "lenet5"])
def test_encoded_images_match_classify(server, model, binary):
    images = [IMAGE_FOR[model], imagegen.photo(seed=3, fmt="PNG"), imagegen.drawn_digit_one()]
    result = client(server).infer(model, [bytes_input(images, binary)],
                                  outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    logits = result.as_numpy("logits")
    assert logits.shape == (3, CLASSES_FOR[model])
    for row, image in zip(logits, images, strict=True):
        assert_same_as_classify(row, classify(server, image, model))


def test_both_input_forms_give_the_same_logits(server):
    """Decoding client-side (UINT8) and server-side (BYTES) is one recipe: serving.preprocess."""
    c = client(server)
    from_pixels = c.infer("lenet5", [pixel_input(pixels("lenet5", DIGIT), True)]).as_numpy("logits")
    from_bytes = c.infer("lenet5", [bytes_input([DIGIT], True)]).as_numpy("logits")
    np.testing.assert_allclose(from_pixels, from_bytes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(server, binary):
    c = client(server)
    images = [PHOTO, imagegen.photo(seed=5)]
    x = pixels("alexnet", *images)
    logits = c.infer("alexnet", [pixel_input(x, True)]).as_numpy("logits")
    result = c.infer("alexnet", [pixel_input(x, True)],
                     outputs=[triton.InferRequestedOutput("logits", binary_data=binary, class_count=4)])
    out = result.get_output("logits")
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 4]
    table = result.as_numpy("logits")
    assert table.shape == (2, 4)
    labels = (DEFAULT_MODELS_DIR / "alexnet" / "labels.txt").read_text().splitlines()
    for r, (row, image) in enumerate(zip(table, images, strict=True)):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        indices = [int(i) for _, i, _ in entries]
        assert [label for _, _, label in entries] == [labels[i] for i in indices]
        scores = [float(s) for s, _, _ in entries]  # Triton's convention: the output value itself, here the logit
        np.testing.assert_allclose(scores, logits[r, indices], atol=1e-5)
        assert scores == sorted(scores, reverse=True)
        assert_same_as_classify(logits[r], [p for p in classify(server, image, "alexnet", 4)])
        assert set(indices) == {p["index"] for p in classify(server, image, "alexnet", 4)}


def test_lenet_classification_reads_the_digit(server):
    result = client(server).infer("lenet5", [bytes_input([DIGIT], True)],
                                  outputs=[triton.InferRequestedOutput("logits", class_count=1)])
    score, index, label = result.as_numpy("logits")[0, 0].decode().split(":")
    assert (index, label) == ("7", "7") and float(score) > 0


def test_async_infer_with_requests_in_flight(server):
    """tritonclient's async_infer, 6 requests on 3 connections at once: every answer is its own image's."""
    c = client(server, concurrency=3)
    images = [imagegen.photo(seed=s) for s in range(6)]
    pending = [c.async_infer("alexnet", [bytes_input([im], True)], request_id=str(i)) for i, im in enumerate(images)]
    results = [p.get_result(block=True, timeout=120) for p in pending]
    for i, (result, image) in enumerate(zip(results, images, strict=True)):
        assert result.get_response()["id"] == str(i)
        assert_same_as_classify(result.as_numpy("logits")[0], classify(server, image, "alexnet"))
    c.close()


def test_n_images_count_as_n_rows_in_the_batcher(server):
    """One 40-image request is one batch of 40 rows in the batcher's accounting (not one "request"), and every row
    comes back in order."""
    images = [imagegen.photo(seed=s) for s in range(4)]
    x = pixels("alexnet", *images)[np.arange(40) % 4]
    calls, rows = batch_rows(server, "alexnet")
    logits = client(server).infer("alexnet", [pixel_input(x, True)]).as_numpy("logits")
    assert batch_rows(server, "alexnet") == (calls + 1, rows + 40)
    assert logits.shape == (40, 1000)
    for i in range(4):
        assert_same_as_classify(logits[36 + i], classify(server, images[i], "alexnet"))
        np.testing.assert_allclose(logits[i::4], np.repeat(logits[i][None], 10, axis=0), rtol=1e-4, atol=1e-5)


def test_id_and_parameters_are_echoed_in_json(server):
    x = pixels("lenet5", DIGIT)
    header = {"id": "req-42", "parameters": {"tenant": "blue", "priority": 1},
              "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    r = v2_post(server, "lenet5", header)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert body["id"] == "req-42" and body["model_name"] == "lenet5" and body["model_version"] == "1"
    assert body["parameters"] == {"tenant": "blue"}  # priority is the protocol's own, not a passenger
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [1, 10] and len(out["data"]) == 10
    assert int(np.argmax(out["data"])) == 7


def test_binary_data_output_request_parameter(server):
    x = pixels("lenet5", DIGIT)
    header = {"parameters": {"binary_data_output": True},
              "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape),
                          "parameters": {"binary_data_size": x.size}}]}
    r = v2_post(server, "lenet5", header, x.tobytes())
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:length])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 40}
    assert int(np.argmax(np.frombuffer(r.content[length:], dtype="<f4"))) == 7


def test_gzip_request_body(server):
    result = client(server).infer("lenet5", [bytes_input([DIGIT], True)], request_compression_algorithm="gzip")
    assert int(np.argmax(result.as_numpy("logits"))) == 7


# ---- bad input: the protocol's {"error"} with 4xx, never a 500 or a hang -------------------------------------------


def triton_error(server: str, model: str, inputs: list, outputs: list | None = None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        client(server).infer(model, inputs, outputs=outputs)
    return e.value


def test_errors_surface_in_tritonclient_with_our_message(server):
    x = pixels("lenet5", DIGIT)
    wrong_type = triton.InferInput("image", list(x.shape), "FP32").set_data_from_numpy(x.astype(np.float32))
    e = triton_error(server, "lenet5", [wrong_type])
    assert e.status() == "400" and "datatype 'FP32'" in e.message() and "UINT8 [-1, 32, 32, 1]" in e.message()
    e = triton_error(server, "lenet5", [pixel_input(pixels("alexnet", PHOTO), True)])
    assert e.status() == "400" and "shape [1, 224, 224, 3]" in e.message()
    e = triton_error(server, "lenet5", [pixel_input(x, True)], [triton.InferRequestedOutput("probs")])
    assert e.status() == "400" and "unknown output 'probs'" in e.message()
    other = triton.InferInput("pixels", list(x.shape), "UINT8").set_data_from_numpy(x)
    e = triton_error(server, "lenet5", [other])
    assert e.status() == "400" and "unknown input 'pixels'" in e.message()
    e = triton_error(server, "lenet5", [pixel_input(x, True), bytes_input([DIGIT], True)])
    assert e.status() == "400" and "send one input" in e.message()


@pytest.mark.parametrize("bad, status, message", [
    (imagegen.random_bytes(), 400, "element 1: "),
    (imagegen.truncated_jpeg(), 400, "element 1: "),
    (imagegen.off_allowlist_image(), 400, "element 1: "),
    (imagegen.huge_dimension_png(), 413, "element 1: "),
], ids=["random-bytes", "truncated-jpeg", "off-allowlist", "over-pixel-cap"])
def test_a_bytes_element_that_is_not_an_image_is_named(server, bad, status, message):
    e = triton_error(server, "alexnet", [bytes_input([PHOTO, bad, PHOTO], True)])
    assert e.status() == str(status) and f"'image_bytes' {message}" in e.message()


def test_json_bytes_must_be_base64(server):
    header = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}
    assert_v2_error(v2_post(server, "lenet5", header), 400, "element 0 is not base64")


X = np.zeros((1, 32, 32, 1), dtype=np.uint8)
GOOD = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1],
                    "parameters": {"binary_data_size": X.size}}]}


def with_input(**changes) -> dict:
    return {"inputs": [{**GOOD["inputs"][0], **changes}]}


@pytest.mark.parametrize("header, binary, header_length, message", [
    (GOOD, X.tobytes()[:-1], None, "only 1,023 bytes of binary data"),
    (GOOD, X.tobytes() + b"\0", None, "1 bytes of binary data follow the json header that no input"),
    (GOOD, X.tobytes(), 10**6, "is 1,000,000 but the request body has"),
    (GOOD, X.tobytes(), -1, "is -1 but the request body has"),
    (GOOD, X.tobytes(), "abc", "must be an integer"),
    (GOOD, X.tobytes(), "+1_0", "must be an integer, not '+1_0'"),
    (GOOD, X.tobytes(), 3, "not valid json"),
    (with_input(shape=[1, 32, 32]), X.tobytes(), None, "has shape [1, 32, 32]"),
    (with_input(shape=[2, 32, 32, 1]), X.tobytes(), None, "needs 2,048 uint8 bytes"),
    (with_input(shape=[0, 32, 32, 1], parameters={"binary_data_size": 0}), b"", None, "batch size 0"),
    (with_input(shape=[65, 32, 32, 1], parameters={"binary_data_size": 65 * 1024}), bytes(65 * 1024), None,
     "batch size 65, must be from 1 to 64"),
    (with_input(datatype="INT8"), X.tobytes(), None, "datatype 'INT8'"),
    (with_input(parameters={"binary_data_size": "1024"}), X.tobytes(), None, "must be a non-negative integer"),
    ({"inputs": []}, b"", None, "'inputs' must be a non-empty list"),
    ({"outputs": [{"name": "logits"}]}, b"", None, "'inputs' must be a non-empty list"),
    (with_input(parameters={}), b"", None, "neither 'data' nor a 'binary_data_size'"),
    (with_input(data=[0] * 1024), X.tobytes(), None, "both 'data' and 'binary_data_size'"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0.5] * 1024}]}, b"",
     None, "must be integers"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [256] * 1024}]}, b"",
     None, "from 0 to 255"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [1] * 1000}]}, b"",
     None, "has 1,000 elements, its shape needs 1,024"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": 8}}]}, struct.pack("<I", 100) + b"abcd", None,
     "element 0 claims 100 bytes"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": len(serialize_bytes([DIGIT]))}}]}, serialize_bytes([DIGIT]),
     None, "holds 1 elements, its shape [2] needs 2"),
    ({**GOOD, "outputs": [{"name": "logits", "parameters": {"classification": -2}}]}, X.tobytes(), None,
     "'classification' must be a positive integer"),
    ({**GOOD, "id": 7}, X.tobytes(), None, "'id' must be a string"),
    ({**GOOD, "parameters": {"sequence_id": 3}}, X.tobytes(), None, "sequence batching is not supported"),
    # echoed in the response, so kept shallow (test_parameters_nested_as_deep_as_json_allows_are_a_400: the 500)
    ({**GOOD, "parameters": {"x": functools.reduce(lambda inner, _: [inner], range(33), [])}}, X.tobytes(), None,
     "'parameters' are nested over 32 levels deep"),
    # 20 MB of zero bytes was 5 million empty elements, listed in full (2 s of the event loop) before the count check
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 4_000_000}}]}, bytes(4_000_000), None,
     "holds more than the 1 elements its shape needs"),
    ([1, 2], b"", None, "must be a json object"),
])
def test_protocol_errors_are_400_with_the_protocols_shape(server, header, binary, header_length, message):
    assert_v2_error(v2_post(server, "lenet5", header, binary, header_length), 400, message)


def test_parameters_nested_as_deep_as_json_allows_are_a_400(server):
    """Unknown request parameters are echoed in the response: 963 levels passed json.loads, then failed json.dumps
    building the answer, a 500 and a traceback in the log per request."""
    pixels = '{"name":"image","datatype":"UINT8","shape":[1,32,32,1],"data":[' + ",".join("0" * 1024) + "]}"
    for depth in (962, 963, 964):
        body = '{"parameters":{"x":' + "[" * depth + "]" * depth + '},"inputs":[' + pixels + "]}"
        r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body, timeout=60)
        assert r.status_code == 400, (depth, r.text)  # "nested over 32 levels", or over what the JSON parser takes


def test_deeply_nested_json_is_a_400(server):
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=b"[" * 100_000, timeout=60)
    assert_v2_error(r, 400, "not valid json")


def test_a_body_of_empty_arrays_is_refused_before_parsing_and_nested_pixels_are_not(server):
    """20 MB of `[],` parsed into ~640 MB of Python lists before anything checked it; nested pixel data, even all
    zeros (the fewest bytes per array), is still served."""
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=b'{"inputs":[{"name":"image","datatype":"UINT8",'
                   b'"shape":[1,32,32,1],"data":[' + b"[]," * 2_000_000 + b"[]]}]}", timeout=60)
    assert_v2_error(r, 400, "2,000,006 json arrays and objects in 6,000,080 bytes")
    zeros = np.zeros((2, 224, 224, 3), np.uint8)
    nested = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 224, 224, 3], "data": zeros.tolist()}]}
    r = httpx.post(f"{server}/v2/models/alexnet/infer", content=json.dumps(nested, separators=(",", ":")), timeout=120)
    assert r.status_code == 200, r.text
    digits = np.zeros((64, 32, 32, 1), np.uint8)  # a digit's arrays are the shortest: 4 bytes, "[0],"
    nested = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [64, 32, 32, 1], "data": digits.tolist()}]}
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=json.dumps(nested, separators=(",", ":")), timeout=120)
    assert r.status_code == 200, r.text


def test_a_framing_header_given_twice_is_refused(server):
    body = json.dumps(GOOD).encode() + X.tobytes()
    length = str(len(json.dumps(GOOD)))
    for name, values in (("Inference-Header-Content-Length", [length, length]),
                         ("Content-Encoding", ["identity", "gzip"])):
        headers = [(name, v) for v in values] + ([] if name != "Content-Encoding" else
                                                 [("Inference-Header-Content-Length", length)])
        r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body, headers=headers, timeout=60)
        assert_v2_error(r, 400, f"the {name} header is given 2 times; give it once")


def test_a_second_gzip_member_is_refused_not_dropped(server):
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1],
                                   "data": [0] * 1024}]}).encode()
    ok = httpx.post(f"{server}/v2/models/lenet5/infer", content=gzip.compress(body),
                    headers={"Content-Encoding": "gzip"}, timeout=60)
    assert ok.status_code == 200, ok.text
    for tail in (gzip.compress(b" "), b"junk"):
        r = httpx.post(f"{server}/v2/models/lenet5/infer", content=gzip.compress(body) + tail,
                       headers={"Content-Encoding": "gzip"}, timeout=60)
        assert_v2_error(r, 400, "follow the end of the gzip stream")


def test_bad_compression_is_a_400_and_a_bomb_is_413(server):
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"},
                   timeout=60)
    assert_v2_error(r, 400, "could not be decompressed")
    bomb = gzip.compress(bytes(30 * 1024 * 1024))  # 30 MiB of zeros in ~30 KB: over the 20 MiB limit inflated
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
    assert_v2_error(r, 413, "decompressed request body exceeds")


def test_oversized_bodies_are_413(server):
    big = imagegen.random_bytes(21 * 1024 * 1024)  # default limit 20 MiB
    header = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(big)}}]}
    assert_v2_error(v2_post(server, "alexnet", header, big), 413, "limit")

    def chunks():  # no Content-Length: Transfer-Encoding: chunked, refused while streaming
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(f"{server}/v2/models/alexnet/infer", content=chunks(), timeout=60)
    assert_v2_error(r, 413, "stopped reading")


VALID_BODY = json.dumps(GOOD).encode()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_length=st.one_of(st.integers(-5, len(VALID_BODY) + X.size + 5),
                               st.text(alphabet="0123456789-+.xe_", min_size=1, max_size=6)),
       size=st.integers(-3, 2 * X.size), cut=st.integers(0, len(VALID_BODY) + X.size),
       garbage=st.binary(max_size=64))
def test_fuzzed_binary_framing_is_always_4xx_or_a_real_answer(server, header_length, size, cut, garbage):
    """Random header lengths, binary_data_size values, truncated bodies and trailing garbage: a 200 with logits when
    the framing happens to be right, else the protocol's 4xx error; never a 500, never a hang (60 s timeout)."""
    header = json.dumps(with_input(parameters={"binary_data_size": size})).encode()
    body = (header + X.tobytes())[:cut] + garbage
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body,
                   headers={"Inference-Header-Content-Length": str(header_length)}, timeout=60)
    if r.status_code == 200:
        length = int(r.headers["Inference-Header-Content-Length"])
        assert json.loads(r.content[:length])["outputs"][0]["shape"] == [1, 10]
    else:
        assert 400 <= r.status_code < 500, r.text
        assert set(r.json()) == {"error"}


def test_server_still_serves_v2_after_the_abuse(server):
    assert client(server).is_server_ready()
    assert int(np.argmax(client(server).infer("lenet5", [bytes_input([DIGIT], True)]).as_numpy("logits"))) == 7


def test_cost_measurement_runs_all_four_paths_and_reads_server_cpu(server):
    """loadtests/v2_cost.measure, what `make bench` calls: real requests, real CPU seconds from /proc."""
    import psutil

    from loadtests.servers import process_tree
    from loadtests.v2_cost import measure

    port = int(server.rsplit(":", 1)[1])
    listening = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    # `bentoml serve --port <port>`, the arbiter: the listening worker's ancestor that started it all
    arbiter = next(a.pid for p in listening for a in psutil.Process(p).parents()
                   if "serve" in (cmd := a.cmdline()) and "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port))
    assert len(process_tree(arbiter)) >= 2
    costs = {c.variant: c for c in measure(server, arbiter, "alexnet", EXAMPLES / "grace_hopper.jpg", requests=3,
                                           warmup=1)}
    assert set(costs) == {"classify", "v2-bytes", "v2-uint8", "v2-uint8-json"}
    assert all(c.images == 3 and c.latency_ms_per_image_median > 0 for c in costs.values())
    assert sum(c.server_cpu_ms_per_image for c in costs.values()) > 0  # AlexNet inference is tens of ms per image
    assert costs["v2-uint8"].client_decode_ms_per_image > 0
    # The server's own account (statistics extension): each request's onnxruntime call lies within its time.
    assert all(0 < c.onnxruntime_ms_per_image < c.server_ms_per_image for c in costs.values()), costs


# ---- a client's value in an error is shown cut short; JSON has no NaN or Infinity -----------------------------------


def assert_small_v2_error(r: httpx.Response, status: int, message_has: str) -> str:
    """The protocol's error naming what was wrong, in well under 1 KB however big the value it refuses (before the
    fix an unknown input name of 15 MB came back whole)."""
    assert len(r.content) < 1024, (len(r.content), r.content[:200])
    return assert_v2_error(r, status, message_has)


HUGE_NAME = "y" * (1 << 20)


@pytest.mark.parametrize("header, message", [
    ({"inputs": [{"name": HUGE_NAME, "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0]}]},
     "unknown input 'yyyy"),
    ({**GOOD, "outputs": [{"name": HUGE_NAME}]}, "unknown output 'yyyy"),
    (with_input(datatype=HUGE_NAME), "has datatype 'yyyy"),
    ({**GOOD, "id": [HUGE_NAME] * 10}, "'id' must be a string"),
    (with_input(shape=[1] * 100_000), "(100,000 items)"),
    (with_input(shape=["\x01" * 100_000]), "'shape' must be a list"),
    ({**GOOD, "parameters": {"binary_data_output": HUGE_NAME}}, "must be true or false"),
    ({**GOOD, "outputs": [{"name": "logits", "parameters": {"classification": HUGE_NAME}}]}, "'classification'"),
], ids=["input-name", "output-name", "datatype", "id", "shape-length", "shape-value", "flag", "classification"])
def test_huge_names_and_values_are_named_not_repeated(server, header, message):
    body = json.dumps(header).encode()
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body + X.tobytes(), timeout=60,
                   headers={"Inference-Header-Content-Length": str(len(body))})
    assert_small_v2_error(r, 400, message)


def test_huge_model_version_and_path_are_cut_in_the_404(server):
    assert_small_v2_error(httpx.get(f"{server}/v2/models/" + "z" * 60_000, timeout=60), 404, "(60,000 characters)")
    assert_small_v2_error(httpx.get(f"{server}/v2/models/lenet5/versions/" + "9" * 60_000, timeout=60), 404,
                          "has no version '999")
    assert_small_v2_error(httpx.get(f"{server}/v2/" + "q" * 60_000, timeout=60), 404, "is not served")
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=b"x", timeout=60,
                   headers={"Inference-Header-Content-Length": "9" * 60_000})
    assert_small_v2_error(r, 400, "must be an integer")
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=b"x", timeout=60,
                   headers={"Content-Encoding": "x" * 60_000})
    assert_small_v2_error(r, 415, "is not supported")
    assert r.headers["accept-encoding"] == "gzip, deflate, identity"  # RFC 9110 §12.5.3: what it would take


def strict_json(text: bytes) -> object:
    """RFC 8259 JSON: NaN, Infinity and -Infinity are not tokens of it (Python's json reads them unless told)."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def with_json_tokens(parameters: bytes = b"{}", data: bytes | None = None) -> bytes:
    """A LeNet-5 JSON request with raw JSON text spliced in (json.dumps would not write NaN into a test)."""
    data = data if data is not None else b",".join([b"0"] * 1024)
    return (b'{"parameters":' + parameters + b',"inputs":[{"name":"image","datatype":"UINT8","shape":[1,32,32,1],'
            b'"data":[' + data + b"]}]}")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_in_request_json_are_a_400(server, token):
    name = token.decode()
    for body in (with_json_tokens(parameters=b'{"x":' + token + b',"tenant":"blue"}'),
                 with_json_tokens(parameters=b'{"x":[1,{"y":' + token + b"}]}"),
                 with_json_tokens(data=b",".join([b"0"] * 1023 + [token])),
                 with_json_tokens(data=b",".join([token] * 1024))):
        r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body, timeout=60)
        message = assert_small_v2_error(r, 400, f"the JSON body has {name}, which JSON (RFC 8259) does not allow")
        assert strict_json(r.content) == {"error": message}
    # binary tensor data after a JSON header: the header is parsed the same way
    header = b'{"parameters":{"x":' + token + b'},"inputs":[{"name":"image","datatype":"UINT8",' \
             b'"shape":[1,32,32,1],"parameters":{"binary_data_size":1024}}]}'
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=header + X.tobytes(), timeout=60,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert_small_v2_error(r, 400, f"has {name}")


def test_a_number_too_large_for_a_float_is_a_400(server):
    """1e400 is valid JSON but reads as inf, which would be echoed back as Infinity."""
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=with_json_tokens(parameters=b'{"x":-1e400}'),
                   timeout=60)
    assert_small_v2_error(r, 400, "'-1e400', too large for a 64-bit float")


def test_finite_parameters_still_echo_as_strict_json(server):
    x = pixels("lenet5", DIGIT)
    body = with_json_tokens(parameters=b'{"x":1.5e300,"y":-0.0,"z":1e-400,"n":12345678901234567890123}',
                            data=",".join(map(str, x.ravel().tolist())).encode())
    r = httpx.post(f"{server}/v2/models/lenet5/infer", content=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = strict_json(r.content)
    assert answer["parameters"] == {"x": 1.5e300, "y": -0.0, "z": 0.0, "n": 12345678901234567890123}
    assert int(np.argmax(answer["outputs"][0]["data"])) == 7


def test_loads_json_reads_what_json_loads_reads_but_non_finite_numbers():
    from serving.errors import NonFiniteNumber
    from serving.http import loads_json

    for text in (b'{"a":[1,2.5,-0.0,1e-400,"\\ud800"]}', '\ufeff{"a":1}'.encode(), '{"a":"é"}'.encode("utf-16"),
                 b"[" + b"9" * 4000 + b"]"):
        assert loads_json(text) == json.loads(text)
    for text in (b"[NaN]", b'{"a":Infinity}', b"[-Infinity]", b"[1e400]", b"[-1E+999]"):
        with pytest.raises(NonFiniteNumber):
            loads_json(text)
    for text in (b"\xff", b"[1,", b"[" * 100_000, b"[" + b"9" * 5000 + b"]"):  # the same errors as json.loads
        with pytest.raises((ValueError, RecursionError)):
            loads_json(text)


# ---- JSON 'data' read by numpy (serving/v2.py, _header_with_flat_data) ------------------------------------------

ODD_ELEMENTS = ["007", "00", "1000", "12345678901234567890", "-1", "1.5", "1e2", "2 3", "", " ", "  ", " 4", "5 ",
                "0x1", "+6", "true", "[7]", '"8"', "NaN"]
SEPARATORS = [",", ", ", ",  ", " ,", " , ", ",\n", ",\t", ", ,", ",,"]
PLACES = {  # where the list goes: only the first is a tensor's data
    "input": '{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [%s]}]}',
    "parameters": '{"parameters": {"data": [%s]}, "inputs": [{"name": "image", "data": [1, 2]}]}',
    "repeated key": '{"inputs": [{"name": "image", "data": [%s], "data": [3]}]}',
    "in a string": '{"id": "\\"data\\": [%s]", "inputs": [{"name": "image", "data": [1]}]}',
    "second input": '{"inputs": [{"name": "image", "data": [1]}, {"name": "x", "data": [%s]}]}',
    "not json": '{"inputs": [{"name": "image", "data": [%s]}]',
    "top level": '[{"data": [%s]}]',
}


@settings(max_examples=200, deadline=None)
# numpy reads an element of spaces as 0, one digit short of what it writes: with a leading zero or a 1000 beside it,
# the digit count came out right.
@example(values=[1] * 600, odd=[(0, "1000"), (1, " ")], separators=[], plain_separator=",", place="input")
@example(values=[1] * 600, odd=[(5, "00")], separators=[(9, ", ,")], plain_separator=", ", place="input")
@example(values=[1] * 600, odd=[(599, " ")], separators=[], plain_separator=",", place="input")
@given(values=st.lists(st.integers(0, 999), min_size=600, max_size=800),  # over the 1,000 characters cut
       odd=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(ODD_ELEMENTS)), max_size=2),
       separators=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SEPARATORS)), max_size=2),
       plain_separator=st.sampled_from([",", ", "]), place=st.sampled_from(list(PLACES)))
def test_json_data_read_by_numpy_is_what_json_loads_reads(values, odd, separators, plain_separator, place):
    """Whenever the numpy path answers, its header is json.loads's, value for value; it answers for every plain list
    in a tensor's data (so a request's values never depend on which way it was read), and for nothing else: odd
    elements and separators, lists elsewhere or in strings, and invalid JSON go the ordinary way."""
    from serving.http import loads_json
    from serving.v2 import _header_with_flat_data

    elements = [str(v) for v in values]
    for at, element in odd:
        elements[at % len(elements)] = element
    seps = [plain_separator] * (len(elements) - 1)
    for at, sep in separators:
        seps[at % len(seps)] = sep
    text = "".join(e + s for e, s in zip(elements, [*seps, ""], strict=True))
    body = (PLACES[place] % text).encode()
    fast = _header_with_flat_data(body)
    between_commas = [e.strip(" ") for e in text.split(",")]  # plain: each as str(int) writes it, below 1000
    plain = all(e.isdigit() and e == str(int(e)) and int(e) < 1000 for e in between_commas)
    assert (fast is not None) == (plain and place in ("input", "second input")), body[:300]
    if fast is not None:
        for tensor in fast["inputs"]:
            if isinstance(tensor["data"], np.ndarray):
                assert tensor["data"].dtype == np.int64
                tensor["data"] = tensor["data"].tolist()
        assert fast == loads_json(body) == json.loads(body)


@pytest.mark.parametrize("separator", [",", ", "])
def test_alexnet_json_tensor_read_by_numpy_matches_binary(server, separator):
    """A whole AlexNet image as a flat JSON list (what KServe's SDK and curl send), compact or with json.dumps's
    spaces: read by numpy, the same logits as the same pixels sent as binary tensor data."""
    x = pixels("alexnet", PHOTO)
    header = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    r = httpx.post(f"{server}/v2/models/alexnet/infer", timeout=60,
                   content=json.dumps(header, separators=(separator, ":")).encode())
    assert r.status_code == 200, r.text
    from_json = np.array(r.json()["outputs"][0]["data"], dtype=np.float32)
    from_binary = client(server).infer("alexnet", [pixel_input(x, True)]).as_numpy("logits")[0]
    np.testing.assert_allclose(from_json, from_binary, rtol=1e-5, atol=1e-6)
