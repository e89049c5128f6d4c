"""The public API under a fuzzer and hostile multipart bodies, over real HTTP against a real `bentoml serve`.

Schemathesis (pinned in the dev group) reads the running service's /docs.json and runs every check it has: no 5xx,
no status or body outside the spec, schema-valid requests accepted, schema-violating ones refused. Image fields
are real image files (tests/fuzz_hooks.py); everything else is what schemathesis generates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import imagegen
import pytest

TESTS = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
FUZZ_SECONDS = 50  # schemathesis' own budget for the run; the test's hard limit is above it
# The Open Inference Protocol routes (serving/v2.py) are fuzzed for server errors only: their generic tensor schema
# cannot say which input names, datatypes and shapes a model takes, so "schema-valid" v2 requests are refused by
# design, and the v2 catch-all answers 404 rather than 405 for an undeclared method (docs/hardening.md).
V2 = "^/v2"


@pytest.mark.slow
def test_schemathesis_all_checks_find_nothing(server, tmp_path):
    def schemathesis(*args: str, seconds: int) -> subprocess.CompletedProcess:
        cmd = [str(SCHEMATHESIS), "run", f"{server}/docs.json", "--max-examples", "30", "--seed", "1",
               "--max-time", str(seconds), "--workers", "1", "--no-color", "--request-timeout", "30", *args]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(TESTS)}
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=seconds + 120)

    run = schemathesis("--checks", "all", "--exclude-path-regex", V2, "--report-junit-path",
                       str(tmp_path / "junit.xml"), seconds=FUZZ_SECONDS)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "No issues found" in out, out[-3000:]
    v2 = schemathesis("--checks", "not_a_server_error", "--include-path-regex", V2, seconds=20)
    assert v2.returncode == 0, (v2.stdout + v2.stderr)[-6000:]  # a warning (e.g. few 2xx answers) is not a failure
    # It really exercised our endpoints, not just loaded the spec.
    for path in ("POST /classify", "POST /classify_batch", "GET /models"):
        assert path in (tmp_path / "junit.xml").read_text(), out[-3000:]


def multipart(disposition: bytes, payload: bytes, boundary: bytes = b"B") -> tuple[bytes, dict[str, str]]:
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + payload +
            b"\r\n--" + boundary + b"--\r\n")
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


@pytest.mark.parametrize("disposition", [
    b'name="\xc2\x82\xf1\xbb\x87\x84E"',  # the fuzzer's find: UTF-8 beyond Latin-1 (used to be a 500)
    b'name="\xff\xfe\x00bad"',  # not UTF-8 at all, with a NUL
    'name="画像"'.encode("shift_jis"),
    b'name="x"; filename="\xe2\x80\xae\xf0\x9f\x90\x88.jpg"',  # right-to-left override + emoji, on an unknown field
])
@pytest.mark.parametrize("endpoint", ["/classify", "/classify_batch"])
def test_multipart_names_in_any_encoding_are_a_4xx(server, endpoint, disposition):
    body, headers = multipart(disposition, b"true")
    r = httpx.post(f"{server}{endpoint}", content=body, headers=headers, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error", "detail"}


def test_non_ascii_filenames_come_back_intact(server):
    name = "chat 猫 – ü.jpg"
    body, headers = multipart(b'name="image"; filename="' + name.encode() + b'"', imagegen.photo(64, 48))
    r = httpx.post(f"{server}/classify_batch", content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["filename"] == name
    latin1, headers = multipart(b'name="image"; filename="caf\xe9.jpg"', imagegen.photo(64, 48))  # not UTF-8
    r = httpx.post(f"{server}/classify_batch", content=latin1, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "caf\ufffd.jpg", r.text


@pytest.mark.parametrize("params", [{"top_k": ""}, {"model": ""}, {"top_k": "1000"}])
def test_a_bad_query_value_is_refused_even_when_a_form_field_overrides_it(server, params):
    files = {"image": ("a.jpg", imagegen.photo(64, 48), "image/jpeg")}
    r = httpx.post(f"{server}/classify", params=params, data={"top_k": "3", "model": "lenet5"}, files=files,
                   timeout=60)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/classify", "POST"), ("DELETE", "/classify_batch", "POST"), ("POST", "/models", "GET, HEAD")])
def test_405_names_the_allowed_methods(server, method, path, allow):
    r = httpx.request(method, f"{server}{path}", timeout=30)
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == set(allow.split(", "))
    assert r.json()["error"] == "method_not_allowed"


def test_spec_requires_the_image_and_bounds_every_parameter(server):
    spec = httpx.get(f"{server}/docs.json", timeout=30).json()
    models = sorted(m["name"] for m in httpx.get(f"{server}/models", timeout=30).json()["models"])
    for path in ("/classify", "/classify_batch"):
        op = spec["paths"][path]["post"]
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["required"] == ["image"] and form["additionalProperties"] is False
        query = {p["name"]: p["schema"] for p in op["parameters"]}
        assert query["model"]["enum"] == models == form["properties"]["model"]["enum"]
        assert (query["top_k"]["minimum"], query["top_k"]["maximum"]) == (1, 100)
        assert {"400", "408", "413", "415", "422", "503", "504"} <= set(op["responses"])
