"""The BentoML service over real HTTP: a real `bentoml serve` (conftest's `server`), real ONNX models, real images."""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import imagegen
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw
from serverproc import server_log

from serving.cgroups import usable_cpus
from training.mnist import load_mnist

MNIST_SAMPLE = Path(__file__).parent / "data" / "mnist-sample"
IMAGENET_LABELS = (Path(__file__).parent.parent / "models" / "alexnet" / "labels.txt").read_text().splitlines()
DIGIT_7 = Path(__file__).parent.parent / "examples" / "digit-7.png"  # a real MNIST test digit, shipped
DEVICE_OF_PROVIDER = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                      "TensorrtExecutionProvider": "tensorrt"}


def post_image(base: str, data: bytes, params: dict | None = None, content_type: str = "image/jpeg",
               field: str = "image", filename: str = "upload") -> httpx.Response:
    return httpx.post(f"{base}/classify", params=params, files={field: (filename, data, content_type)}, timeout=60)


def post_raw(base: str, data: bytes, content_type: str | None, params: dict | None = None) -> httpx.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return httpx.post(f"{base}/classify", params=params, content=data, headers=headers, timeout=60)


def assert_predictions(preds: list[dict], k: int, labels: list[str]) -> None:
    assert len(preds) == k
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s <= 1.0 for s in scores) and sum(scores) <= 1.0 + 1e-6
    for p in preds:
        assert p["label"] == labels[p["index"]]


def assert_error(r: httpx.Response, status: int, code: str, detail_has: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert body["detail"] and detail_has.lower() in body["detail"].lower(), body


def metric_samples(base: str, name: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """{labels-string: value} for one metric name in /metrics."""
    text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def metric_total(base: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include all of `labels` (0 when there are none yet)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metric_samples(base, name).items() if all(w in k for w in wanted))


def gpu_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


# ---- health, docs, models -----------------------------------------------------------------------------------


def test_health_endpoints(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200


def test_openapi_lists_our_endpoints_and_swagger_ui_is_served(server):
    spec = httpx.get(f"{server}/docs.json").json()
    assert {"/classify", "/classify_batch", "/models"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    index = httpx.get(f"{server}/")
    assert index.status_code == 200 and "html" in index.headers["content-type"]
    assert "swagger-ui-bundle.js" in index.text and "googletagmanager" not in index.text  # BentoML's page, no call home


def test_models_lists_cards_with_runtime(server):
    body = httpx.get(f"{server}/models").json()
    assert body["default_model"] == "alexnet"
    cards = {c["name"]: c for c in body["models"]}
    assert set(cards) == {"alexnet", "lenet5"}
    assert cards["alexnet"]["num_classes"] == 1000 and cards["lenet5"]["num_classes"] == 10
    available = set(ort.get_available_providers())
    for card in cards.values():
        runtime = card["runtime"]
        # Whatever the host: the providers the server runs are ones this onnxruntime build has, and the device it
        # reports is the first of them. Without a GPU driver the fallback must be a clean CPU start.
        assert runtime["providers"] and set(runtime["providers"]) <= available, (runtime, available)
        assert runtime["device"] == DEVICE_OF_PROVIDER[runtime["providers"][0]], runtime
        if not gpu_driver_present():
            assert runtime["device"] == "cpu", runtime
            assert (runtime["precision"], runtime["onnx"]) == ("fp32", card["onnx"]["path"]), runtime  # fp16: GPU only
        print(f"{card['name']} ran on {runtime['device']} ({runtime['providers'][0]})")
        assert card["version"] and card["weights"] and card["preprocessing"]["kind"] in ("imagenet", "digit")
    # On a CPU both models run in the front worker itself (no hop), micro-batched.
    assert cards["alexnet"]["runtime"]["placement"] == "front worker, micro-batched"
    assert cards["lenet5"]["runtime"]["placement"] == "front worker, micro-batched"
    # Sized for the CPUs this machine gives the server (tests/test_cgroups.py: a container's quota), one worker each.
    cpus = usable_cpus()
    workers = min(cpus, 4)
    for card in cards.values():
        runtime = card["runtime"]
        assert (runtime["cpus"], runtime["workers"], runtime["threads"]) == (cpus, workers, cpus // workers), runtime


# ---- classification -----------------------------------------------------------------------------------------


def test_alexnet_multipart_default_model_and_top_k(server):
    r = post_image(server, imagegen.photo(640, 480))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "alexnet" and body["version"] and body["weights"]
    assert_predictions(body["predictions"], 5, IMAGENET_LABELS)


def test_alexnet_top_k_100_and_raw_body_content_types(server):
    photo = imagegen.photo(500, 375, seed=3)
    answers = []
    for ctype in ("image/jpeg", "application/octet-stream", None):
        r = post_raw(server, photo, ctype, {"model": "alexnet", "top_k": "100"})
        assert r.status_code == 200, (ctype, r.text)
        assert_predictions(r.json()["predictions"], 100, IMAGENET_LABELS)
        answers.append(r.json()["predictions"])
    multipart = post_image(server, photo, {"top_k": 100}, content_type="application/octet-stream")
    answers.append(multipart.json()["predictions"])
    # The same bytes give the same answer whichever way they arrive.
    assert all([p["index"] for p in a] == [p["index"] for p in answers[0]] for a in answers)


def test_multipart_parameters_as_form_fields_and_curl_style_parts(server):
    r = httpx.post(f"{server}/classify", data={"model": "lenet5", "top_k": "3"},
                   files={"image": ("one.png", imagegen.drawn_digit_one(), "image/png")})
    assert r.status_code == 200 and r.json()["model"] == "lenet5" and len(r.json()["predictions"]) == 3
    # A part without filename or content type (curl -F 'image=<file') is still an image.
    boundary = "XbOuNdArY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n").encode() \
        + imagegen.drawn_digit_one() + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(f"{server}/classify?model=lenet5", content=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text


def test_a_content_encoding_is_refused_not_ignored(server):
    """A gzip-compressed PNG was answered "not an image", and a plain one labelled gzip was served: the header was
    never read. Images are compressed already; identity is the only coding taken, and the 415 says so."""
    digit = imagegen.drawn_digit_one()
    for path, kwargs in (("/classify", {"content": gzip.compress(digit), "headers": {"Content-Type": "image/png"}}),
                         ("/classify", {"files": {"image": ("1.png", digit, "image/png")}}),
                         ("/classify_batch", {"files": {"image": ("1.png", digit, "image/png")}}),
                         ("/model_input", {"files": {"image": ("1.png", digit, "image/png")}})):
        headers = {**kwargs.pop("headers", {}), "Content-Encoding": "gzip"}
        r = httpx.post(f"{server}{path}?model=lenet5", headers=headers, timeout=30, **kwargs)
        assert r.status_code == 415, (path, r.text)
        assert r.json() == {"error": "unsupported_media_type", "detail": "Content-Encoding 'gzip' is not accepted "
                            "here: send the image as it is (image formats are compressed already)"}
        assert r.headers["accept-encoding"] == "identity", path  # RFC 9110 §12.5.3: the codings it does take
    r = httpx.post(f"{server}/classify?model=lenet5", content=digit,
                   headers={"Content-Type": "image/png", "Content-Encoding": "identity"}, timeout=30)
    assert r.status_code == 200, r.text


def test_head_of_the_openapi_document_says_what_get_sends(server):
    get, head = httpx.get(f"{server}/docs.json", timeout=30), httpx.head(f"{server}/docs.json", timeout=30)
    assert get.status_code == head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))


def test_a_parameter_given_twice_is_refused_not_guessed(server):
    one = {"image": ("one.png", imagegen.drawn_digit_one(), "image/png")}
    in_query = httpx.post(f"{server}/classify?model=lenet5&model=alexnet", files=one)
    in_form = httpx.post(f"{server}/classify", data={"model": "lenet5", "top_k": ["1", "5"]}, files=one)
    batch = httpx.post(f"{server}/classify_batch?top_k=1&top_k=2&model=lenet5", files=one)
    for r, what in ((in_query, "query parameter 'model'"), (in_form, "form field 'top_k'"),
                    (batch, "query parameter 'top_k'")):
        assert r.status_code == 422, r.text
        assert r.json() == {"error": "bad_parameter", "detail": f"the {what} is given more than once; give it once"}


def test_lenet_reads_real_mnist_digits_as_png_and_jpeg(server):
    images, labels = load_mnist(MNIST_SAMPLE, "test")
    correct = total = 0
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        for start in range(0, len(images), 50):
            chunk = range(start, min(start + 50, len(images)))
            files = [("image", (f"{i}.{fmt.lower()}", imagegen.digit_png(images[i], fmt=fmt), ctype)) for i in chunk]
            r = httpx.post(f"{server}/classify_batch", params={"model": "lenet5", "top_k": 1}, files=files,
                           timeout=60)
            assert r.status_code == 200, r.text
            for i, item in zip(chunk, r.json()["results"], strict=True):
                correct += item["predictions"][0]["index"] == labels[i]
                total += 1
    assert total == 2 * len(images)
    assert correct / total >= 0.98, f"{correct}/{total} correct"


def drawn_digit(digit: int, size: int = 240) -> bytes:
    """A digit drawn with a thick dark pen on white paper."""
    im = Image.new("L", (size, size), 245)
    d = ImageDraw.Draw(im)
    w, s = size // 12, size
    if digit == 0:
        d.ellipse((s * 0.3, s * 0.15, s * 0.7, s * 0.85), outline=15, width=w)
    elif digit == 7:
        d.line((s * 0.25, s * 0.2, s * 0.75, s * 0.2), fill=15, width=w)
        d.line((s * 0.75, s * 0.2, s * 0.42, s * 0.85), fill=15, width=w)
    return imagegen.encode(im, "PNG")


@pytest.mark.parametrize("digit", [0, 1, 7])
def test_lenet_reads_a_dark_on_white_drawn_digit(server, digit):
    data = imagegen.drawn_digit_one() if digit == 1 else drawn_digit(digit)
    r = post_image(server, data, {"model": "lenet5", "top_k": 1}, content_type="image/png")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] == str(digit), r.json()


def test_batch_results_in_order_with_per_item_errors(server):
    files = [("image", ("a.jpg", imagegen.photo(320, 240, seed=1), "image/jpeg")),
             ("image", ("junk.bin", imagegen.random_bytes(), "application/octet-stream")),
             ("image", ("b.png", imagegen.photo(300, 300, seed=2, fmt="PNG"), "image/png")),
             ("image", ("notes.txt", imagegen.TEXT, "text/plain")),
             ("image", ("cut.jpg", imagegen.truncated_jpeg(), "image/jpeg"))]
    r = httpx.post(f"{server}/classify_batch", params={"top_k": 2}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "alexnet"
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3, 4]
    assert [x["filename"] for x in results] == ["a.jpg", "junk.bin", "b.png", "notes.txt", "cut.jpg"]
    assert_predictions(results[0]["predictions"], 2, IMAGENET_LABELS)
    assert_predictions(results[2]["predictions"], 2, IMAGENET_LABELS)
    assert (results[1]["status"], results[1]["error"]) == (400, "not_an_image")
    assert (results[3]["status"], results[3]["error"]) == (415, "unsupported_media_type")
    assert (results[4]["status"], results[4]["error"]) == (400, "corrupt_image")
    # The "images" field name (one per image) is accepted too.
    r = httpx.post(f"{server}/classify_batch?model=lenet5", files=[("images", ("1.png", imagegen.drawn_digit_one(),
                                                                                "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "1"


def test_concurrent_requests_are_batched(server):
    def hist():
        count = sum(v for k, v in metric_samples(server, "convnet_batch_size_count").items() if 'model="alexnet"' in k)
        ones = sum(v for k, v in metric_samples(server, "convnet_batch_size_bucket").items()
                   if 'model="alexnet"' in k and 'le="1.0"' in k)
        return count, ones

    before = hist()
    photos = [imagegen.photo(400, 300, seed=s) for s in range(4)]
    gate = threading.Barrier(16)

    def one(i: int) -> int:
        gate.wait()
        return post_raw(server, photos[i % 4], "image/jpeg", {"top_k": 1}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(one, range(16))) == [200] * 16
    count, ones = hist()
    batches, single = count - before[0], ones - before[1]
    assert 0 < batches < 16, (before, count, ones)  # 16 requests took fewer model calls
    assert single < batches  # at least one call carried more than one image


def test_worker_threads_carry_their_names_into_the_os(server):
    """A front worker's decoding and inference threads are named for the OS too (serving/threads.py): `top -H` and
    py-spy show them, and `make bench` splits each image's CPU by them (loadtests/servers.py)."""
    import psutil

    from loadtests.servers import thread_cpu_seconds

    port = int(server.rsplit(":", 1)[1])
    fronts = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    for seed in range(6):  # a new connection each: the kernel spreads them over the front workers
        assert post_raw(server, imagegen.photo(400, 300, seed=seed), "image/jpeg", {"top_k": 1}).status_code == 200
    names = {Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
             for pid in fronts for tid in os.listdir(f"/proc/{pid}/task")}
    assert {"decode_0", "infer-alexnet_0"} <= names, names
    by_name: dict[str, float] = {}
    for pid in fronts:
        for name, seconds in thread_cpu_seconds(pid).items():
            by_name[name] = by_name.get(name, 0.0) + seconds
    assert {"main", "decode", "infer-alexnet"} <= set(by_name), by_name
    assert by_name["infer-alexnet"] > 0 and by_name["main"] > 0, by_name  # AlexNet ran, the event loop answered


def test_our_metrics_count_each_request(server):
    """Each counter rises by exactly what this test sent (the session server has served other tests before)."""
    series = {
        "ok": ("convnet_requests_total", {"endpoint": "classify", "model": "lenet5", "outcome": "ok"}),
        "refused": ("convnet_requests_total", {"endpoint": "classify", "model": "lenet5", "outcome": "not_an_image"}),
        "batch_ok": ("convnet_requests_total", {"endpoint": "classify_batch", "model": "lenet5", "outcome": "ok"}),
        "decode_failures": ("convnet_decode_failures_total", {"model": "lenet5", "error": "not_an_image"}),
        "images": ("convnet_images_total", {"model": "lenet5"}),
        "preprocessed": ("convnet_preprocess_seconds_count", {"model": "lenet5"}),
        "timed_ok": ("convnet_request_seconds_count", {"endpoint": "classify", "model": "lenet5"}),
        "timed_batch_ok": ("convnet_request_seconds_count", {"endpoint": "classify_batch", "model": "lenet5"}),
        "inferences": ("convnet_inference_seconds_count", {"model": "lenet5"}),
        "inference_rows": ("convnet_batch_size_sum", {"model": "lenet5"}),
    }

    def snapshot() -> dict[str, float]:
        return {key: metric_total(server, name, **labels) for key, (name, labels) in series.items()}

    before = snapshot()
    assert post_image(server, imagegen.random_bytes(), {"model": "lenet5"}).status_code == 400
    assert post_image(server, imagegen.drawn_digit_one(), {"model": "lenet5"}, content_type="image/png").is_success
    files = [("image", ("1.png", imagegen.drawn_digit_one(), "image/png")),
             ("image", ("junk.bin", imagegen.random_bytes(), "application/octet-stream")),
             ("image", ("7.png", DIGIT_7.read_bytes(), "image/png"))]
    assert httpx.post(f"{server}/classify_batch", params={"model": "lenet5"}, files=files, timeout=60).is_success
    after = snapshot()
    rose = {key: after[key] - before[key] for key in series}
    # 2 images classified by the batch (its junk item is a per-item error), 1 by /classify; 4 uploads decoded. The
    # answers of the two that succeeded are timed; each ran one onnxruntime call (1 row, then 2).
    assert rose == {"ok": 1, "refused": 1, "batch_ok": 1, "decode_failures": 2, "images": 3, "preprocessed": 5,
                    "timed_ok": 1, "timed_batch_ok": 1, "inferences": 2, "inference_rows": 3}, rose
    assert metric_total(server, "convnet_request_seconds_sum", endpoint="classify", model="lenet5") > 0


def test_collector_pauses_and_tracked_objects_are_reported(server):
    """Requests leave nothing for the garbage collector, so it runs only after 10,000 objects allocated and not yet
    freed (serving/service.py, GC_THRESHOLDS): one JSON body of 30,000 small lists makes it run. /metrics then shows
    the pause, in wall time and in CPU time, and the objects the collector tracks."""
    def gen0() -> float:
        return metric_total(server, "convnet_gc_pause_seconds_count", generation="0")

    before = gen0()
    header = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [[0]] * 30_000}]}
    r = httpx.post(f"{server}/v2/models/lenet5/infer", json=header, timeout=60)
    assert r.status_code == 400 and "'image'" in r.json()["error"], r.text[:300]  # 30,000 elements, not 1,024
    assert gen0() >= before + 1
    pauses = metric_samples(server, "convnet_gc_pause_seconds_count")  # the collector's pauses, per generation
    cpu = metric_samples(server, "convnet_gc_pause_cpu_seconds_count")  # the same pauses in the thread's CPU time
    assert set(cpu) == set(pauses) and all(v >= 1 for v in cpu.values()), (cpu, pauses)
    tracked = metric_samples(server, "convnet_gc_tracked_objects")  # one sample per worker
    assert tracked and all(0 < v < 1_000_000 for v in tracked.values()), tracked


# ---- bad input: always a JSON 4xx and a healthy server afterwards --------------------------------------------

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")  # Pillow knows EPS (rendering it needs Ghostscript)
PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages /Kids [] /Count 0 >> "
       b"endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")

# name, bytes, content type, status, error code, what the detail must say
DECODE_CASES = [
    ("truncated", imagegen.truncated_jpeg(), "image/jpeg", 400, "corrupt_image", "corrupt or truncated"),
    ("random", imagegen.random_bytes(), "application/octet-stream", 400, "not_an_image", "not a recognised image"),
    ("text-as-image", imagegen.TEXT, "image/png", 400, "not_an_image", "not a recognised image"),
    ("html-as-image", imagegen.HTML, "image/jpeg", 400, "not_an_image", "not a recognised image"),
    ("zero-bytes", b"", "image/jpeg", 400, "not_an_image", "empty (0 bytes)"),
    ("targa", imagegen.off_allowlist_image(), "image/x-tga", 400, "unsupported_format", "format TGA is not accepted"),
    ("eps", EPS, "application/postscript", 415, "unsupported_media_type", "'application/postscript'"),
    ("eps-as-image", EPS, "image/x-eps", 400, "unsupported_format", "format EPS is not accepted"),
    ("pdf-as-image", PDF, "application/octet-stream", 400, "not_an_image", "not a recognised image"),
    ("huge-dimensions", imagegen.huge_dimension_png(), "image/png", 413, "image_too_large", "10000.0 MP"),
    ("text", imagegen.TEXT, "text/plain", 415, "unsupported_media_type", "'text/plain', which cannot be an image"),
    ("html", imagegen.HTML, "text/html", 415, "unsupported_media_type", "'text/html', which cannot be an image"),
    ("json", b'{"image": "cat.jpg"}', "application/json", 415, "unsupported_media_type", "'application/json'"),
]


@pytest.mark.parametrize("name,data,ctype,status,code,detail", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_bad_uploads_multipart_and_raw(server, name, data, ctype, status, code, detail):
    assert_error(post_image(server, data, {"model": "lenet5"}, content_type=ctype), status, code, detail)
    assert_error(post_raw(server, data, ctype, {"model": "lenet5"}), status, code, detail)


def lab_tiff(gray: np.ndarray) -> bytes:
    """A CIE L*a*b* TIFF of a grey picture: L* from the grey level, a* = b* = 0 (neutral)."""
    zeros = np.zeros_like(gray)
    return imagegen.encode(Image.fromarray(np.dstack([gray, zeros, zeros]), "LAB"), "TIFF")


def ycbcr_tiff(gray: np.ndarray) -> bytes:
    """A YCbCr TIFF (photometric YCbCr, as scanners write) of a grey picture: Y = grey, Cb = Cr = 128 (no colour)."""
    mid = np.full_like(gray, 128)
    return imagegen.encode(Image.fromarray(np.dstack([gray, mid, mid]), "YCbCr"), "TIFF")


def digit_7_as(kind: str) -> bytes:
    gray = np.asarray(Image.open(DIGIT_7).convert("L"))
    if kind == "LAB-TIFF":
        return lab_tiff(gray)
    if kind == "YCbCr-TIFF":
        return ycbcr_tiff(gray)
    im = Image.fromarray(gray, "L")
    if kind == "WEBP":
        return imagegen.encode(im.convert("RGB"), "WEBP", lossless=True)
    return imagegen.encode(im, kind)


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "YCbCr-TIFF", "LAB-TIFF"])
def test_every_allowed_format_and_colour_space_reads_the_digit(server, kind):
    """The same real MNIST 7 in each allowlisted format (and in YCbCr and L*a*b* colour spaces) is read as a 7."""
    data = digit_7_as(kind)
    assert Image.open(io.BytesIO(data)).format == kind.split("-")[-1]
    r = post_raw(server, data, "application/octet-stream", {"model": "lenet5", "top_k": 1})
    assert r.status_code == 200, r.text
    best = r.json()["predictions"][0]
    assert best["label"] == "7" and best["score"] > 0.9, (kind, best)


ODD_BUT_VALID = [
    ("one-pixel", imagegen.tiny_png(), "image/png"),
    ("16-bit", imagegen.sixteen_bit_png(), "image/png"),
    ("cmyk", imagegen.cmyk_jpeg(), "image/jpeg"),
    ("animated-gif", imagegen.animated_gif(), "image/gif"),
    ("palette-alpha", imagegen.palette_alpha_png(), "image/png"),
    ("float-tiff", imagegen.float_tiff(), "image/tiff"),
    ("png-labelled-jpeg", imagegen.photo(300, 200, fmt="PNG"), "image/jpeg"),  # wrong type: content decides
    ("no-type", imagegen.photo(300, 200), ""),
]


@pytest.mark.parametrize("name,data,ctype", ODD_BUT_VALID, ids=[c[0] for c in ODD_BUT_VALID])
@pytest.mark.parametrize("model", ["lenet5", "alexnet"])
def test_odd_but_valid_images_are_classified(server, name, data, ctype, model):
    files = {"image": ("x.jpg", data, ctype)} if ctype else {"image": ("x", data)}
    r = httpx.post(f"{server}/classify", params={"model": model, "top_k": 3}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    labels = IMAGENET_LABELS if model == "alexnet" else [str(d) for d in range(10)]
    assert_predictions(r.json()["predictions"], 3, labels)


def test_exif_rotation_is_applied(server):
    """The 7 stored on its side with EXIF orientation 8 ("rotate 90° anticlockwise to display") reads as a 7;
    the same pixels without the tag do not (LeNet-5 reads that as a 4), so the test sees whether EXIF was applied."""
    upright = Image.open(DIGIT_7).convert("L")
    sideways = upright.rotate(-90, expand=True)  # stored turned 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 8
    tagged = imagegen.encode(sideways, "JPEG", exif=exif.tobytes(), quality=95)
    untagged = imagegen.encode(sideways, "JPEG", quality=95)
    best = post_image(server, tagged, {"model": "lenet5", "top_k": 1}).json()["predictions"][0]
    assert best["label"] == "7" and best["score"] > 0.9, best
    assert post_image(server, untagged, {"model": "lenet5", "top_k": 1}).json()["predictions"][0]["label"] != "7"
    # AlexNet gets the same upright crop: the tagged photo and its upright re-encoding rank classes alike.
    rotated = imagegen.exif_rotated_jpeg()
    upright_photo = imagegen.encode(Image.open(io.BytesIO(rotated)).transpose(Image.Transpose.ROTATE_270),
                                    "JPEG", quality=95)
    a = post_image(server, rotated, {"top_k": 3}).json()["predictions"]
    b = post_image(server, upright_photo, {"top_k": 3}).json()["predictions"]
    assert [p["index"] for p in a] == [p["index"] for p in b]


def test_unknown_paths_and_methods_are_json_errors(server):
    # BentoML's router answers paths that are not ours; its plain-text 404 and 405 come out as our JSON too
    for path in ("/nothing-here", "/Classify", "/classify;x=1", "/docs"):
        assert_error(httpx.get(f"{server}{path}"), 404, "not_found", f"GET {path}: Not Found")
    probe = httpx.post(f"{server}/livez")
    assert_error(probe, 405, "method_not_allowed", "POST /livez")
    assert set(probe.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert_error(httpx.get(f"{server}/classify"), 405, "method_not_allowed", "GET /classify")
    assert_error(httpx.post(f"{server}/models"), 405, "method_not_allowed", "POST /models")
    assert_error(httpx.get(f"{server}/classify_batch"), 405, "method_not_allowed", "GET /classify_batch")


@pytest.mark.parametrize("params,field,status,code,detail", [
    ({"model": "resnet"}, "image", 422, "unknown_model", "resnet"),
    ({"top_k": "0"}, "image", 422, "bad_parameter", "top_k"),
    ({"top_k": "101"}, "image", 422, "bad_parameter", "top_k"),
    ({"top_k": "five"}, "image", 422, "bad_parameter", "top_k"),
    # int() takes these; a top_k of plain ASCII digits is all the API accepts
    ({"top_k": "1_0"}, "image", 422, "bad_parameter", "not '1_0'"),
    ({"top_k": "+5"}, "image", 422, "bad_parameter", "not '+5'"),
    ({"top_k": " 5"}, "image", 422, "bad_parameter", "not ' 5'"),
    ({"top_k": "١٠"}, "image", 422, "bad_parameter", "top_k must be an integer"),
    ({"top_k": "9" * 5000}, "image", 422, "bad_parameter", "(5,000 characters)"),
    ({"topk": "3"}, "image", 422, "bad_parameter", "topk"),
    ({}, "file", 422, "bad_parameter", "'file'"),
])
def test_bad_parameters(server, params, field, status, code, detail):
    r = post_image(server, imagegen.tiny_png(), {"model": "lenet5", **params}, "image/png", field=field)
    assert_error(r, status, code, detail)


def test_missing_image_and_malformed_multipart(server):
    assert_error(httpx.post(f"{server}/classify", data={"model": "lenet5"}, files={"top_k": (None, "3")}),
                 422, "missing_image")
    bad = b"--XX\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc"  # no closing boundary
    r = httpx.post(f"{server}/classify", content=bad, headers={"Content-Type": "multipart/form-data; boundary=XX"})
    assert_error(r, 400, "bad_request", "multipart")
    long_boundary = "b" * 300  # over python-multipart's 256: was a 500
    r = httpx.post(f"{server}/classify", content=f"--{long_boundary}\r\n".encode(),
                   headers={"Content-Type": f"multipart/form-data; boundary={long_boundary}"})
    assert_error(r, 400, "bad_request", "boundary in the Content-Type is 300 characters long")
    assert_error(post_raw(server, b"model=alexnet", "application/x-www-form-urlencoded"), 415,
                 "unsupported_media_type", "curl")
    assert_error(httpx.post(f"{server}/classify_batch", content=imagegen.tiny_png(),
                            headers={"Content-Type": "image/png"}), 415, "unsupported_media_type")


def test_malformed_multipart_bodies_leave_no_line_in_the_log(server_proc):
    """python-multipart logs a warning for each malformed body it reads. The client gets the same words in its 400 and
    /metrics counts it, so a line per request would only let any client fill the operator's log."""
    server = server_proc.base_url
    before = len(server_log(server_proc, tail=10_000_000))
    for body in (b"--XX\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",  # no closing boundary
                 b"--YY\r\n\r\nabc\r\n--XX--\r\n",  # the wrong boundary
                 b"--XX\r\nBad Header: 1\r\n\r\nabc\r\n--XX--\r\n"):  # a space in a header name
        r = httpx.post(f"{server}/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=XX"})
        assert_error(r, 400, "bad_request", "multipart")
    assert httpx.get(f"{server}/models").status_code == 200  # a request after them: their lines would be written
    new_lines = server_log(server_proc, tail=10_000_000)[before:]
    assert "WARNING" not in new_lines and "boundary" not in new_lines, new_lines


def _raw_classify(jpeg: bytes) -> bytes:
    return (b"POST /classify?model=alexnet&top_k=1 HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: %d\r\n\r\n" % len(jpeg)) + jpeg


def test_a_client_that_half_closes_gets_its_answer_and_one_that_leaves_writes_no_traceback(server_proc):
    """A client that closes its sending side after its request (`nc -N`) got no AlexNet answer: uvicorn took the
    half-close for a disconnect. A client that pipelined two requests and left made the first answer's write raise in
    uvloop: a 30-line "Exception in ASGI application" in the log per connection, which any client could repeat."""
    host, port = server_proc.base_url.removeprefix("http://").split(":")
    photo = imagegen.photo(320, 240)
    before = len(server_log(server_proc, tail=10_000_000))
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(_raw_classify(photo) + _raw_classify(photo))
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == 2 and got.count(b'"predictions"') == 2, got[:2000]
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(_raw_classify(photo) + _raw_classify(photo))  # and leave at once
    assert httpx.get(f"{server_proc.base_url}/models").status_code == 200
    time.sleep(1.0)  # the answers in progress when they left are written (or dropped) by now
    new_lines = server_log(server_proc, tail=10_000_000)[before:]
    assert "Traceback" not in new_lines and "Exception in ASGI application" not in new_lines, new_lines[-3000:]


def test_a_trailing_slash_redirects_to_a_relative_location_whatever_the_host_header(server):
    """Starlette built the redirect's URL from the Host header (`Host: evil.example` → `Location:
    http://evil.example/classify`); it is relative now, and a client that follows it still gets its answer."""
    for method, path, location in (("POST", "/classify/?model=lenet5", "/classify?model=lenet5"),
                                   ("GET", "/models/", "/models"), ("GET", "/readyz/", "/readyz"),
                                   ("GET", "/metrics/", "/metrics"), ("POST", "/model_input/", "/model_input")):
        r = httpx.request(method, f"{server}{path}", headers={"Host": "evil.example"})
        assert r.status_code == 307 and r.headers["location"] == location, (path, r.status_code, r.headers)
    r = httpx.post(f"{server}/classify/?model=lenet5", content=DIGIT_7.read_bytes(),
                   headers={"Content-Type": "image/png"}, follow_redirects=True)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7", r.text


def test_oversized_bodies_are_refused_with_413(server):
    big = imagegen.random_bytes(21 * 1024 * 1024)  # default limit 20 MiB
    assert_error(post_raw(server, big, "image/jpeg"), 413, "body_too_large", "limit")
    assert_error(post_image(server, big), 413, "body_too_large", "limit")

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(f"{server}/classify", content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert_error(r, 413, "body_too_large", "stopped reading")


def test_server_still_healthy_after_bad_input(server):
    for data, ctype in ((imagegen.random_bytes(), "image/jpeg"), (imagegen.huge_dimension_png(), "image/png"),
                        (b"", "")):
        post_raw(server, data, ctype or None)
    assert httpx.get(f"{server}/readyz").status_code == 200
    r = post_image(server, imagegen.drawn_digit_one(), {"model": "lenet5"}, content_type="image/png")
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "1"


# ---- a client's value in an error detail is shown cut short ----------------------------------------------------


def test_shown_is_repr_for_short_values_and_bounded_for_any_value():
    from serving.errors import SHOWN_CHARS, shown, shown_path

    for value in ("five", "", "it's", ["file", "topk"], 7, None, 2.5, b"\x00"):
        assert shown(value) == repr(value)
    cut = shown("\x01" * 19_000_000)  # repr-escaped: each \x01 is 4 characters; the detail is not 76 MB
    assert cut.startswith("'\\x01") and cut.endswith("... (19,000,000 characters)") and len(cut) < SHOWN_CHARS + 40
    for value in ("😀" * 10**5, b"\xff" * 10**6, ["a" * 10**6] * 1000, [[[["x"] * 100] * 100] * 100] * 100,
                  {str(i) * 1000: i for i in range(1000)}, 10**4000, 10**5000, [1] * 10**6):
        assert len(shown(value)) < 2_000, shown(value)[:200]
    assert shown([1] * 10**6).endswith("(1,000,000 items)")
    assert shown_path("/classify") == "/classify" and len(shown_path("/" + "z" * 60_000)) < SHOWN_CHARS + 40


def assert_small_error(r: httpx.Response, status: int, code: str, detail_has: str) -> None:
    """A refusal of a huge value: the usual JSON error, naming what was wrong, in well under 1 KB (before the fix
    the detail repeated the value repr-escaped: 19 MB of \\x01 gave a 99.6 MB answer)."""
    assert len(r.content) < 1024, (len(r.content), r.content[:200])
    assert_error(r, status, code, detail_has)


@pytest.mark.parametrize("path, name", [("/classify", "model"), ("/classify", "top_k"), ("/classify_batch", "model"),
                                        ("/classify_batch", "top_k"), ("/model_input", "model")])  # no top_k there
def test_a_huge_parameter_value_is_named_not_repeated(server, path, name):
    huge = "\x01" * (1 << 20)
    r = httpx.post(f"{server}{path}", data={name: huge}, timeout=60,
                   files={"image": ("digit.png", imagegen.tiny_png(), "image/png")})
    code = "unknown_model" if name == "model" else "bad_parameter"
    assert_small_error(r, 422, code, "model" if name == "model" else "top_k")
    assert "(1,048,576 characters)" in r.json()["detail"]
    r = httpx.post(f"{server}{path}", params={name: "x" * 50_000}, timeout=60,  # the query string's own value
                   files={"image": ("digit.png", imagegen.tiny_png(), "image/png")})
    assert_small_error(r, 422, code, "(50,000 characters)")


def test_the_reviewed_19_mb_top_k_gets_a_small_answer(server):
    """The review's case: a valid image and a top_k form field of 19 MB of \\x01 bytes."""
    r = httpx.post(f"{server}/classify", data={"top_k": "\x01" * (19 << 20)}, timeout=120,
                   files={"image": ("digit.png", imagegen.tiny_png(), "image/png")})
    assert_small_error(r, 422, "bad_parameter", "top_k must be an integer")


def test_huge_or_many_unknown_field_names_are_named_not_repeated(server):
    fields = [(f"{i}-" + "n" * 1000, (None, "1")) for i in range(500)]  # 500 unknown fields, 1 KB names
    r = httpx.post(f"{server}/classify", files=[("image", ("d.png", imagegen.tiny_png(), "image/png")), *fields],
                   timeout=60)
    assert_small_error(r, 422, "bad_parameter", "unknown multipart field")
    assert "(500 items)" in r.json()["detail"]
    r = httpx.post(f"{server}/classify", params={"x" * 50_000: "1"}, content=imagegen.tiny_png(),
                   headers={"Content-Type": "image/png"}, timeout=60)
    assert_small_error(r, 422, "bad_parameter", "unknown parameter")
    r = httpx.post(f"{server}/classify", content=imagegen.tiny_png(), timeout=60,
                   headers={"Content-Type": "text/" + "x" * 50_000})
    assert_small_error(r, 415, "unsupported_media_type", "cannot be an image")


def test_a_huge_path_under_our_routes_is_cut_in_the_404(server):
    r = httpx.get(f"{server}/demo/" + "z" * 60_000, timeout=60)
    assert_small_error(r, 404, "not_found", "(60,006 characters)")
