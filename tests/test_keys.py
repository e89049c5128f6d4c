"""Optional API keys: the key file and its helper (`python -m serving.keys`), and a real `bentoml serve` of LeNet-5
with CONVNET_API_KEYS_FILE set, over HTTP: 401s, 200s, open probes, per-key metrics, live revocation, and the batch
CLI's --api-key / CONVNET_API_KEY."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serverproc import free_port, server_log, start_server, started_server, stop_server
from test_batch import cli, read_jsonl
from test_service import metric_samples

from serving.keys import (
    KEY_PREFIX,
    RECHECK_S,
    KeyFile,
    KeyFileError,
    RequireAPIKey,
    digest,
    key_line,
    parse_key_file,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGIT_7 = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
RELOAD_TIMEOUT_S = 15.0  # the server re-checks the file every second; generous for a loaded machine


def keys_cli(key_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.keys", "--file", str(key_file), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def new_key(key_file: Path, name: str) -> str:
    r = keys_cli(key_file, "new", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(r: httpx.Response, invalid_token: bool) -> None:
    assert r.status_code == 401, (r.request.url, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "unauthorized", body
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and ('error="invalid_token"' in challenge) == invalid_token, challenge


# ---- the key file and its helper ---------------------------------------------------------------------------


def test_helper_prints_a_key_once_and_stores_only_its_hash(tmp_path):
    key_file = tmp_path / "keys.txt"
    alice, bob = new_key(key_file, "alice"), new_key(key_file, "bob")
    assert alice.startswith(KEY_PREFIX) and len(alice) >= len(KEY_PREFIX) + 43 and alice != bob
    text = key_file.read_text()
    assert alice not in text and bob not in text
    assert key_line("alice", alice) in text.splitlines() and key_line("bob", bob) in text.splitlines()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert keys_cli(key_file, "list").stdout.split() == ["alice", "bob"]
    assert keys_cli(key_file, "new", "alice").returncode == 2  # names are unique
    assert keys_cli(key_file, "revoke", "alice").returncode == 0
    assert keys_cli(key_file, "list").stdout.split() == ["bob"]
    assert keys_cli(key_file, "revoke", "alice").returncode == 1
    assert KeyFile(key_file).verify(bob) == "bob" and KeyFile(key_file).verify(alice) is None


def test_malformed_key_file_is_refused_without_echoing_it():
    pasted_key = KEY_PREFIX + "A" * 43
    with pytest.raises(KeyFileError, match="line 2") as info:
        parse_key_file(f"# comment\n{pasted_key} alice\n")
    assert pasted_key not in str(info.value)
    with pytest.raises(KeyFileError, match="used twice"):
        parse_key_file(f"sha256:{'0' * 64} a\nsha256:{'1' * 64} a\n")
    unnamed = parse_key_file(f"sha256:{digest('x').hex()}\n")
    assert unnamed[0].name == digest("x").hex()[:12]


def test_open_paths_by_setting():
    protected = RequireAPIKey(None, key_file=None, metrics_open=False)  # type: ignore[arg-type]
    default = RequireAPIKey(None, key_file=None)  # type: ignore[arg-type]
    for path in ("/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready", "/docs.json", "/demo",
                 "/demo/app.js", "/demo.html"):
        assert protected.is_open(path) and default.is_open(path), path
    for path in ("/classify", "/classify_batch", "/models", "/v2/models/lenet5/infer", "/v2", "/demolish"):
        assert not default.is_open(path), path
    assert default.is_open("/metrics") and not protected.is_open("/metrics")


def test_good_and_bad_keys_take_the_same_time(tmp_path):
    """A simple timing attack: time many checks of the right key against a wrong one, interleaved so the machine's
    load hits both alike. With 2000 stored keys, stopping at the match (the right key is first) would make the right
    key ~100x faster; every digest is compared instead, so the medians agree. Ratio bound, not a time bound."""
    keys = [f"{KEY_PREFIX}{i:043d}" for i in range(2000)]
    key_file = tmp_path / "keys.txt"
    key_file.write_text("".join(key_line(f"k{i}", k) + "\n" for i, k in enumerate(keys)))
    checker = KeyFile(key_file)
    good, bad = keys[0], keys[0][:-1] + "x"  # the wrong key differs in its last character
    times: dict[str, list[float]] = {"good": [], "bad": []}
    for _ in range(300):
        for label, key in (("good", good), ("bad", bad)):
            t0 = time.perf_counter()
            checker.verify(key)
            times[label].append(time.perf_counter() - t0)
    ratio = statistics.median(times["good"]) / statistics.median(times["bad"])
    assert 0.5 < ratio < 2.0, ratio
    assert checker.verify(good) == "k0" and checker.verify(bad) is None


# ---- a real server with keys on ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """(base URL, key file, {name: key}, server process) with /metrics protected too (CONVNET_METRICS_AUTH=key)."""
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    keys = {name: new_key(key_file, name) for name in ("alice", "bob")}
    env = {"CONVNET_API_KEYS_FILE": str(key_file), "CONVNET_METRICS_AUTH": "key"}
    with started_server(env=env, models=["lenet5"]) as (base, proc):
        yield base, key_file, keys, proc


def classify(base: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base}/classify", params={"model": "lenet5", "top_k": 1}, content=DIGIT_7,
                      headers={"Content-Type": "image/png", **(headers or {})}, timeout=60)


def test_protected_endpoints_need_a_key(keyed):
    base, _, keys, _ = keyed
    batch = {"files": [("image", ("a.png", DIGIT_7, "image/png"))]}
    cases = [({}, False), (bearer("cnv_not-a-key"), True), (bearer(keys["alice"] + "x"), True),
             ({"Authorization": f"Basic {keys['alice']}"}, False), ({"Authorization": "Bearer"}, False)]
    for headers, invalid in cases:
        assert_unauthorized(classify(base, headers), invalid)
        assert_unauthorized(httpx.post(f"{base}/classify_batch", headers=headers, timeout=60, **batch), invalid)
        assert_unauthorized(httpx.get(f"{base}/models", headers=headers, timeout=10), invalid)
        # Not a route yet: refused by path, so the /v2 inference protocol routes are covered when they land.
        assert_unauthorized(httpx.get(f"{base}/v2/models/lenet5", headers=headers, timeout=10), invalid)
        assert_unauthorized(httpx.get(f"{base}/metrics", headers=headers, timeout=10), invalid)


def test_good_key_is_answered_and_probes_need_none(keyed):
    base, _, keys, _ = keyed
    r = classify(base, bearer(keys["alice"]))
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7", r.text
    r = classify(base, {"authorization": f"bearer {keys['bob']}"})  # the scheme is case-insensitive
    assert r.status_code == 200, r.text
    assert httpx.get(f"{base}/models", headers=bearer(keys["bob"]), timeout=10).json()["default_model"] == "lenet5"
    for path in ("/livez", "/readyz", "/docs.json"):
        assert httpx.get(f"{base}{path}", timeout=10).status_code == 200, path


def test_per_key_counts_in_metrics_and_no_key_in_metrics_or_log(keyed):
    base, _, keys, proc = keyed
    for _ in range(3):
        assert classify(base, bearer(keys["bob"])).status_code == 200
    assert classify(base, bearer("cnv_wrong")).status_code == 401
    auth = httpx.get(f"{base}/metrics", headers=bearer(keys["alice"]), timeout=10)
    assert auth.status_code == 200
    for key in keys.values():
        assert key not in auth.text and key not in server_log(proc, tail=1_000_000)
    accepted = metric_samples(base, "convnet_api_key_requests_total", bearer(keys["alice"]))
    refused = metric_samples(base, "convnet_api_key_refusals_total", bearer(keys["alice"]))
    assert accepted.get('{key="bob"}', 0) >= 3, accepted
    assert refused.get('{reason="invalid"}', 0) >= 1 and refused.get('{reason="missing"}', 0) >= 1, refused


def test_key_file_reloads_when_it_changes_without_a_restart(keyed):
    base, key_file, keys, proc = keyed
    pids = proc.pid
    carol = new_key(key_file, "carol")
    wait_for_status(base, carol, 200)
    assert keys_cli(key_file, "revoke", "bob").returncode == 0
    wait_for_status(base, keys["bob"], 401)
    assert classify(base, bearer(keys["alice"])).status_code == 200
    # A broken file fails closed (a revoked key must never come back), then recovers once fixed.
    good_text = key_file.read_text()
    key_file.write_text(good_text + "not a key line\n")
    wait_for_status(base, keys["alice"], 401)
    key_file.write_text(good_text)
    wait_for_status(base, keys["alice"], 200)
    # Each front worker re-reads on its own clock (at most once per RECHECK_S, on a request): past one interval,
    # whichever worker takes the next request has the repaired file.
    time.sleep(RECHECK_S + 0.2)
    assert classify(base, bearer(carol)).status_code == 200 and proc.pid == pids and proc.poll() is None


def wait_for_status(base: str, key: str, status: int) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while (got := classify(base, bearer(key)).status_code) != status:
        assert time.monotonic() < deadline, f"still HTTP {got} after {RELOAD_TIMEOUT_S:.0f} s"
        time.sleep(0.2)


def test_batch_cli_sends_the_key(keyed, tmp_path):
    base, _, keys, _ = keyed
    image = tmp_path / "seven.png"
    image.write_bytes(DIGIT_7)
    out = tmp_path / "out.jsonl"
    args = (str(image), "--model", "lenet5", "--top-k", "1", "--url", base, "--progress", "off")
    r = cli(*args, "-o", str(out))
    assert r.returncode == 2 and "needs an API key" in r.stderr, r.stderr
    r = cli(*args, "-o", str(out), "--api-key", "cnv_wrong")
    assert r.returncode == 2 and "refused the API key" in r.stderr, r.stderr
    os.environ["CONVNET_API_KEY"] = keys["alice"]
    try:
        r = cli(*args, "-o", str(out))  # from the environment, as the load tests read it
    finally:
        del os.environ["CONVNET_API_KEY"]
    assert r.returncode == 0, r.stderr
    assert read_jsonl(out)[0]["predictions"][0]["label"] == "7"


def test_locustfile_reads_the_key_from_the_environment():
    code = "import loadtests.locustfile as f; print(f.AUTH)"
    env = {**os.environ, "CONVNET_API_KEY": "cnv_from-env"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'Authorization': 'Bearer cnv_from-env'" in r.stdout


def test_server_refuses_to_start_with_a_missing_key_file(tmp_path):
    port = free_port()
    missing = tmp_path / "nope.txt"
    proc = start_server(port, env={"CONVNET_API_KEYS_FILE": str(missing)}, models=["lenet5"])
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server kept running without its key file:\n{server_log(proc)}")
    finally:
        stop_server(proc)
    assert proc.returncode != 0 and str(missing) in server_log(proc, tail=20_000)


def test_helpers_run_at_once_lose_no_key_and_revive_no_revoked_one(keyed):
    """Each helper reads the file, then renames a new one over it. Several at once (a `revoke` and some `new`s, as
    two operators or a deploy script might start them) must not rewrite the file from a stale read: every key
    printed must work on the server, and the revoked one must not come back."""
    base, key_file, _, _ = keyed
    made: dict[str, str] = {}
    revoked: list[str] = []
    for round_ in range(3):
        victim = f"victim{round_}"
        revoked.append(new_key(key_file, victim))
        commands = [("revoke", victim)] + [("new", f"r{round_}n{i}") for i in range(6)]
        procs = [subprocess.Popen([sys.executable, "-m", "serving.keys", "--file", str(key_file), *command],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
        outputs = [proc.communicate(timeout=60) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), outputs
        made.update({name: out.strip() for (_, name), (out, _) in zip(commands[1:], outputs[1:], strict=True)})
    try:
        wait_for_status(base, made["r2n5"], 200)
        time.sleep(RECHECK_S + 0.2)  # every front worker past its next re-check
        for name, key in made.items():
            r = httpx.get(f"{base}/models", headers=bearer(key), timeout=10)
            assert r.status_code == 200, f"the key printed for {name!r} was lost: {r.status_code}"
        for key in revoked:
            assert_unauthorized(httpx.get(f"{base}/models", headers=bearer(key), timeout=10), invalid_token=True)
    finally:
        for name in made:
            keys_cli(key_file, "revoke", name)


def test_revoking_in_place_with_the_old_mtime_put_back_takes_effect(keyed):
    """A rewrite in place of the same size with the old mtime restored (touch -r, cp -p, rsync -t, unpacking an
    archive with fixed dates) keeps inode, size and mtime: the server must still see the change (by the ctime)."""
    base, key_file, _, _ = keyed
    key = new_key(key_file, "mallory")
    wait_for_status(base, key, 200)
    every_worker_accepts(base, key)  # so no worker reads the file for the first time after the rewrite below
    before = key_file.stat()
    text = key_file.read_text()
    replaced = text.replace(key_line("mallory", key), key_line("mallory", KEY_PREFIX + "someone-else"))
    assert replaced != text and len(replaced) == len(text)
    with open(key_file, "r+", encoding="utf-8") as fh:  # same inode
        fh.write(replaced)
    os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = key_file.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    try:
        wait_for_status(base, key, 401)
        time.sleep(RECHECK_S + 0.2)
        for _ in range(10):  # new connections: spread over the front workers
            assert_unauthorized(httpx.get(f"{base}/models", headers=bearer(key), timeout=10), invalid_token=True)
    finally:
        keys_cli(key_file, "revoke", "mallory")


def every_worker_accepts(base: str, key: str) -> None:
    """Past one re-check interval, ten requests on new connections: each front worker has re-read the file and
    accepts `key` (a worker re-checks on a request, at most once per RECHECK_S)."""
    time.sleep(RECHECK_S + 0.2)
    for _ in range(10):
        assert httpx.get(f"{base}/models", headers=bearer(key), timeout=10).status_code == 200


def test_several_authorization_headers_are_refused_whichever_comes_first(keyed):
    """Which of two Authorization headers counts is ambiguous (the first was taken; a proxy in front may check the
    last): a valid key next to another credential, in either order, is a 400 naming the problem, never a 200."""
    base, _, keys, _ = keyed
    good = f"Bearer {keys['alice']}"
    for values in ([good, "Bearer cnv_other"], ["Bearer cnv_other", good], [good, good], [good, "Basic eDp5"]):
        headers = [("Authorization", value) for value in values]
        for r in (httpx.get(f"{base}/models", headers=headers, timeout=10),
                  httpx.post(f"{base}/classify", params={"model": "lenet5"}, content=DIGIT_7,
                             headers=[*headers, ("Content-Type", "image/png")], timeout=60)):
            assert r.status_code == 400, (values, r.status_code, r.text)
            assert r.json() == {"error": "bad_request", "detail": "the request has 2 Authorization headers: send "
                                "exactly one, 'Authorization: Bearer <key>'"}, r.text
            assert r.headers["www-authenticate"] == 'Bearer realm="convnet-serving", error="invalid_request"'
            assert keys["alice"] not in r.text
    assert httpx.get(f"{base}/livez", headers=[("Authorization", good)] * 2, timeout=10).status_code == 200


def test_helper_keeps_the_files_owner_and_explains_what_it_cannot_edit(tmp_path):
    """Run as root on a file the server's user owns, the helper's rename used to hand the file to root (0600): the
    server could no longer read it and refused every key. Files it cannot edit get a message, not a traceback."""
    key_file = tmp_path / "keys.txt"
    alice = new_key(key_file, "alice")
    if os.geteuid() == 0:
        os.chown(key_file, 65534, 65534)  # nobody: the service's own user, say
        bob = new_key(key_file, "bob")
        st = key_file.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
        assert KeyFile(key_file).verify(bob) == "bob" and KeyFile(key_file).verify(alice) == "alice"
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"# caf\xe9\n")
    for path in (tmp_path, tmp_path / "no-such-dir" / "keys.txt", not_utf8):
        for args in (("new", "carol"), ("revoke", "alice"), ("list",)):
            r = keys_cli(path, *args)
            assert r.returncode in (1, 2) and "Traceback" not in r.stderr and str(path) in r.stderr, (args, r.stderr)


def raw_request(base: str, request_line: str, body: bytes = b"") -> tuple[int, bytes]:
    """(status, body) of one request sent as written: httpx would normalise the target."""
    host, port = base.removeprefix("http://").split(":")
    head = f"{request_line}\r\nHost: {host}\r\nConnection: close\r\nContent-Type: image/png\r\n" \
           f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode("latin-1") + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_no_spelling_of_a_protected_path_gets_past_the_check(keyed):
    """The check is on the decoded path the router also uses: percent-encoding, dot segments, an open prefix
    (/demo/, /livez/, /static_content/) followed by `..`, `;` parameters and absolute-form targets either get the
    401 or reach no endpoint (404/405: the router does not resolve `..`). `*` names no path: a POST to it is
    malformed (400, RFC 9112 §3.2.4). None classifies the image."""
    base, _, _, _ = keyed
    port = base.rsplit(":", 1)[1]
    refused = ["/%63lassify", "//classify", "/classify/", "/Classify", "/classify;x=1", "/%2Fclassify",
               f"http://127.0.0.1:{port}/classify", "http://elsewhere/classify", "/./classify",
               "/livez/../classify", "/livez%2f..%2fclassify", "/v2/health/live/../../classify", "/%6dodel_input",
               "/v2/models/lenet5/%69nfer"]
    unrouted = ["/demo/../classify", "/demo/..%2fclassify", "/demo/%2e%2e/classify", "/demo.x/../../classify",
                "/static_content/../classify", "/demo/..;/classify", "/demo/..%5cclassify"]
    for target in refused + unrouted + ["*"]:
        status, body = raw_request(base, f"POST {target}?model=lenet5 HTTP/1.1", DIGIT_7)
        expected = {401} if target in refused else {400} if target == "*" else {401, 404, 405}
        assert status in expected, (target, status, body)
        assert b"predictions" not in body and body.startswith(b"{"), (target, body)
    for method in ("HEAD", "OPTIONS"):  # OPTIONS passes the check (CORS preflights) but no route acts on it
        status, body = raw_request(base, f"{method} /models HTTP/1.1")
        assert status in (401, 405) and b"default_model" not in body, (method, status, body)
