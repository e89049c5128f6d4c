"""The demo page (/demo) in a real browser against the real service, and the endpoint it relies on (/model_input).

Debian's Chromium (installed by `make test`, scripts/apt-tools.sh) driven by Playwright for Python, pointed at the
system binary because Playwright's own browser download is unreachable offline. The `server` fixture is the real
`bentoml serve` (tests/conftest.py) with the real ONNX models. Every page records its console errors and every
request it makes; a test fails on an unexpected console error or on any request that leaves the service's origin.
Screenshots of each state go to results/demo/ (git-ignored).
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.preprocess import preprocess_bytes
from serving.registry import read_card

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serverproc import started_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "examples" / "grace_hopper.jpg"
DIGIT_7 = REPO / "examples" / "digit-7.png"
STATIC = REPO / "serving" / "static"
SHOTS = REPO / "results" / "demo"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ANSWER_TIMEOUT_MS = 60_000  # the machine is shared: generous, and only an upper bound
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# A clear "1" and "7", as polylines in fractions of the drawing area: one stroke each, as a person draws them.
ONE = [[(0.50, 0.15), (0.50, 0.85)]]
SEVEN = [[(0.25, 0.18), (0.75, 0.18), (0.45, 0.85)]]


def recipe(model: str):
    return read_card(REPO / "models" / model).recipe


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return np.asarray(im)


# ---- /model_input and the headers, over plain HTTP --------------------------------------------------------------


def test_model_input_is_the_exact_tensor_the_preprocessing_made(server):
    for model, image, shape in (("alexnet", PHOTO, (224, 224, 3)), ("lenet5", DIGIT_7, (32, 32))):
        data = image.read_bytes()
        r = httpx.post(f"{server}/model_input", params={"model": model}, files={"image": (image.name, data)},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        got = png_array(r.content)
        want = preprocess_bytes(data, recipe(model))
        assert got.shape == shape
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_model_input_errors_are_the_services_json(server):
    def post(params: dict, files) -> httpx.Response:
        return httpx.post(f"{server}/model_input", params=params, files=files, timeout=60)

    photo = PHOTO.read_bytes()
    r = post({"model": "alexnet"}, {"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", r.text
    r = post({"model": "nope"}, {"image": ("a.jpg", photo, "image/jpeg")})
    assert r.status_code == 422 and r.json()["error"] == "unknown_model", r.text
    two = [("image", ("a.jpg", photo, "image/jpeg")), ("image", ("b.jpg", photo, "image/jpeg"))]
    r = post({"model": "alexnet"}, two)
    assert r.status_code == 422 and "one image" in r.json()["detail"], r.text
    r = post({"model": "alexnet", "top_k": "5"}, {"image": ("a.jpg", photo, "image/jpeg")})
    assert r.status_code == 422 and "top_k" in r.json()["detail"], r.text


def test_classify_body_unchanged_and_server_timing_added(server):
    r = httpx.post(f"{server}/classify", params={"model": "lenet5"}, files={"image": DIGIT_7.read_bytes()},
                   timeout=60)
    assert r.status_code == 200
    assert set(r.json()) == {"model", "version", "weights", "predictions"}
    assert re.fullmatch(r"app;dur=\d+\.\d", r.headers["server-timing"])


def test_page_and_files_have_strict_security_headers(server):
    for path, mtype in (("/demo", "text/html"), ("/demo/demo.js", "text/javascript"), ("/demo/demo.css", "text/css"),
                        ("/demo/favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{server}{path}", timeout=10)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(mtype), path
        assert r.headers["x-content-type-options"] == "nosniff", path
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
        assert csp["connect-src"] == "'self'" and csp["img-src"] == "'self'", csp
    assert httpx.get(f"{server}/demo/../serving/api.py", timeout=10).status_code == 404
    assert httpx.get(f"{server}/demo/demo.html", timeout=10).status_code == 404  # the page lives at /demo only
    r = httpx.get(f"{server}/demo/", timeout=10)
    assert r.status_code == 308 and r.headers["location"] == "/demo"


def test_static_files_are_self_contained():
    """No inline script or style, no event-handler attributes, nothing fetched from another origin."""
    html = (STATIC / "demo.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="demo/demo.js" defer>']
    assert not re.search(r"\sstyle=|\son[a-z]+=|<style\b", html)
    for f in STATIC.iterdir():
        text = f.read_text()
        assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", text), f"{f.name} loads another origin"
        assert not re.search(r"\bfetch\(\s*[\"'`]https?:", text), f.name


def test_model_input_is_in_the_openapi_spec(server):
    spec = httpx.get(f"{server}/docs.json", timeout=10).json()
    assert "image/png" in spec["paths"]["/model_input"]["post"]["responses"]["200"]["content"]


# ---- the page in Chromium ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `scripts/apt-tools.sh chromium=chromium` (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


class Session:
    """One browser context on the page: what it logged, what it requested, and where its screenshots go."""

    def __init__(self, browser, server: str, viewport: dict, **context_args) -> None:
        self.origin = server
        self.context = browser.new_context(viewport=viewport, **context_args)
        self.context.set_default_timeout(ANSWER_TIMEOUT_MS)
        self.console_errors: list[str] = []
        self.expected_errors: list[str] = []  # regexes for errors a test provokes on purpose
        self.off_origin: list[str] = []
        self.requests: list = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r))

    def _route(self, route) -> None:
        url = route.request.url
        if url == self.origin or url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.off_origin.append(url)
            route.abort()

    def open(self) -> None:
        self.page.goto(f"{self.origin}/demo")
        self.page.wait_for_selector("body[data-ready=true]", state="attached")

    def answers(self, panel: str) -> int:
        return int(self.page.get_attribute(f"#{panel}", "data-answers") or 0)

    def wait_answer(self, panel: str, before: int) -> str:
        self.page.wait_for_selector(f"#{panel}[data-answers='{before + 1}']", state="attached")
        return self.page.get_attribute(f"#{panel}", "data-state")

    def upload(self, files) -> str:
        before = self.answers("photo")
        self.page.set_input_files("#photo-file", files)
        return self.wait_answer("photo", before)

    def draw(self, strokes: list[list[tuple[float, float]]]) -> str:
        """Real mouse events on the canvas; returns the panel state after the answer to the last stroke."""
        box = self.page.locator("#digit-canvas").bounding_box()
        mouse = self.page.mouse
        for stroke in strokes:
            before = self.answers("digit")
            (x0, y0), rest = stroke[0], stroke[1:]
            mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
            mouse.down()
            for x, y in rest:
                mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
            mouse.up()
            state = self.wait_answer("digit", before)
        return state

    def bars(self, panel: str) -> list[tuple[str, str]]:
        items = self.page.locator(f"#{panel}-bars li")
        return [(items.nth(i).locator(".label").inner_text(), items.nth(i).locator(".score").inner_text())
                for i in range(items.count())]

    def canvas(self, selector: str) -> np.ndarray:
        """The canvas's pixels as RGBA uint8 (height, width, 4)."""
        w, h, b64 = self.page.evaluate("""(sel) => {
            const c = document.querySelector(sel);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let s = ""; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
            return [c.width, c.height, btoa(s)];
        }""", selector)
        return np.frombuffer(base64.b64decode(b64), dtype=np.uint8).reshape(h, w, 4)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def check_clean(self) -> None:
        assert not self.off_origin, f"requests left the origin: {self.off_origin}"
        unexpected = [e for e in self.console_errors if not any(re.search(p, e) for p in self.expected_errors)]
        assert not unexpected, f"console errors: {unexpected}"


@pytest.fixture
def session(browser, server) -> Iterator[Session]:
    s = Session(browser, server, DESKTOP)
    try:
        yield s
        s.check_clean()
    finally:
        s.context.close()


def test_swagger_ui_at_root_links_to_the_page(browser, server):
    s = Session(browser, server, DESKTOP)
    # Nothing may leave the origin: BentoML's template embeds Google Tag Manager, which the service strips
    # (serving/upstream.py), and our description replaced its default README with img.shields.io badges.
    try:
        s.page.goto(f"{server}/")
        link = s.page.get_by_role("link", name="the demo page, /demo")
        with s.context.expect_page() as opened:  # Swagger UI opens description links in a new tab
            link.click()
        page = opened.value
        page.wait_for_selector("body[data-ready=true]", state="attached")
        assert page.url == f"{server}/demo"
        assert s.page.locator("#swagger-ui .opblock").count() > 0  # Swagger UI drew the operations from /docs.json
        s.check_clean()
    finally:
        s.context.close()


def test_photo_gives_five_labelled_bars_latency_and_the_crop_the_model_saw(session, server):
    session.open()
    assert session.page.input_value("#model") == "alexnet"
    assert session.upload(str(PHOTO)) == "done"
    direct = httpx.post(f"{server}/classify", params={"model": "alexnet", "top_k": 5},
                        files={"image": PHOTO.read_bytes()}, timeout=60).json()["predictions"]
    bars = session.bars("photo")
    assert [label for label, _ in bars] == [p["label"] for p in direct]
    assert all(re.fullmatch(r"\d+\.\d%", score) for _, score in bars)
    assert re.search(r"server \d+ ms · round trip \d+ ms", session.page.inner_text("#photo-latency"))
    # The crop shown is, pixel for pixel, what serving.preprocess fed AlexNet.
    shown = session.canvas("#photo-model-input")
    np.testing.assert_array_equal(shown[:, :, :3], preprocess_bytes(PHOTO.read_bytes(), recipe("alexnet")))
    assert (shown[:, :, 3] == 255).all()
    original = session.canvas("#photo-original")
    with Image.open(PHOTO) as im:
        assert original.shape[1::-1] == im.size
    session.shot("photo-desktop")


def test_untrained_model_gets_the_banner_and_trained_one_does_not(session, server):
    cards = {c["name"]: c for c in httpx.get(f"{server}/models", timeout=10).json()["models"]}
    session.open()
    options = session.page.locator("#model option").all_inner_texts()
    assert options == [f"{n} v{c['version']} · {c['weights']}" for n, c in sorted(cards.items())]
    for name, card in sorted(cards.items()):
        session.page.select_option("#model", name)
        banner = session.page.locator("#untrained-banner")
        if card["weights"] == "untrained-demo":
            assert banner.is_visible() and "meaningless" in banner.inner_text()
            assert "make alexnet-official" in banner.inner_text()
            session.shot(f"banner-{name}")
        else:
            assert banner.is_hidden(), name


def test_drawn_one_and_seven_are_read_by_lenet5(session):
    session.open()
    assert session.draw(ONE) == "done"
    assert session.bars("digit")[0][0] == "1", session.bars("digit")
    seen = session.canvas("#digit-model-input")[:, :, 0]
    # The normalised 32×32 input is shown, not the drawing: ink fitted into 20 px, centred by mass, 2 px padding.
    # (Strong ink, not exactly 255: a thin stroke resampled into 20 px can blur below full intensity, by how many
    # pointer events the browser delivered.)
    assert seen.shape == (32, 32) and seen.max() >= 192
    assert not seen[:2].any() and not seen[-2:].any() and not seen[:, :2].any() and not seen[:, -2:].any()
    ys, xs = np.nonzero(seen)
    assert ys.max() - ys.min() + 1 == 20
    session.shot("digit-1")
    session.page.click("#digit-clear")
    assert session.bars("digit") == [] and session.page.get_attribute("#digit-model-input", "width") == "1"
    assert session.draw(SEVEN) == "done"
    assert session.bars("digit")[0][0] == "7", session.bars("digit")
    session.shot("digit-7")
    assert session.upload(str(PHOTO)) == "done"
    session.shot("overview-desktop")  # both panels answered: the picture docs/demo.png is taken from


def test_text_file_shows_the_services_own_error(session, server):
    notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture\n"}
    direct = httpx.post(f"{server}/classify", files={"image": ("notes.txt", notes["buffer"], "text/plain")},
                        timeout=60).json()
    session.expected_errors = [r"Failed to load resource: .* 415"]
    session.open()
    assert session.upload(notes) == "error"
    assert session.page.inner_text("#photo-error") == direct["detail"]
    assert session.page.is_visible("#photo-error") and session.bars("photo") == []
    session.shot("error-text-file")


def test_too_large_file_shows_the_services_own_error(session, tmp_path):
    session.expected_errors = [r"Failed to load resource: .* 413"]
    session.open()
    big = tmp_path / "huge.jpg"  # a path, not a buffer: a local browser reads it itself (the buffer took ~15 s)
    big.write_bytes(b"\xff\xd8" + bytes(21 * 1024 * 1024))
    assert session.upload(str(big)) == "error"
    assert re.fullmatch(r"the request body is [\d,]+ bytes, over the [\d,]+-byte limit",
                        session.page.inner_text("#photo-error"))


def test_drop_and_paste_classify_too(session):
    session.open()
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    make_file = "(b64) => new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], 'p.jpg', {type: 'image/jpeg'})"
    before = session.answers("photo")
    session.page.evaluate(f"""(b64) => {{
        const dt = new DataTransfer(); dt.items.add(({make_file})(b64));
        const zone = document.getElementById("drop-zone");
        for (const type of ["dragenter", "dragover", "drop"])
            zone.dispatchEvent(new DragEvent(type, {{dataTransfer: dt, bubbles: true, cancelable: true}}));
    }}""", b64)
    assert session.wait_answer("photo", before) == "done" and len(session.bars("photo")) == 5
    before = session.answers("photo")
    session.page.evaluate(f"""(b64) => {{
        const dt = new DataTransfer(); dt.items.add(({make_file})(b64));
        document.dispatchEvent(new ClipboardEvent("paste", {{clipboardData: dt, bubbles: true, cancelable: true}}));
    }}""", b64)
    assert session.wait_answer("photo", before) == "done" and len(session.bars("photo")) == 5


def test_api_key_is_sent_when_given_and_nothing_is_stored(session):
    session.open()
    assert session.upload(str(PHOTO)) == "done"
    assert all("authorization" not in r.headers for r in session.requests)
    session.page.fill("#api-key", "k-123")
    session.requests.clear()
    assert session.draw(ONE) == "done"
    api_calls = [r for r in session.requests if "/classify" in r.url or "/model_input" in r.url]
    assert len(api_calls) == 2 and all(r.headers.get("authorization") == "Bearer k-123" for r in api_calls)
    stored = session.page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""] and session.context.cookies() == []


def test_keyboard_reaches_every_control_and_switches_the_model(session):
    session.open()
    reached = []
    for _ in range(12):
        session.page.keyboard.press("Tab")
        reached.append(session.page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
    assert {"model", "api-key", "photo-file", "digit-clear"} <= set(reached), reached
    session.page.focus("#model")
    session.page.keyboard.press("ArrowDown")  # alexnet → lenet5
    assert session.page.input_value("#model") == "lenet5"
    assert session.page.locator("#untrained-banner").is_hidden()


def test_phone_width_layout_and_touch_drawing(browser, server):
    s = Session(browser, server, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    try:
        s.open()
        assert s.upload(str(PHOTO)) == "done" and len(s.bars("photo")) == 5
        # Against the phone's width, not innerWidth: mobile Chromium widens the layout viewport to fit overflow.
        assert s.page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        s.shot("phone-photo")
        # A "1" drawn with real touch events (Chromium's input pipeline, through CDP: Playwright has no touch drag).
        s.page.locator("#digit-canvas").scroll_into_view_if_needed()
        box = s.page.locator("#digit-canvas").bounding_box()
        cdp = s.context.new_cdp_session(s.page)
        x = box["x"] + box["width"] / 2
        before, scrolled = s.answers("digit"), s.page.evaluate("() => window.scrollY")
        for i in range(13):
            y = box["y"] + (0.15 + 0.7 * i / 12) * box["height"]
            cdp.send("Input.dispatchTouchEvent", {"type": "touchStart" if i == 0 else "touchMove",
                                                  "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        assert s.wait_answer("digit", before) == "done"
        assert s.bars("digit")[0][0] == "1", s.bars("digit")
        assert s.page.evaluate("() => window.scrollY") == scrolled  # the drag drew; it did not scroll the page
        s.shot("phone-digit")
        s.check_clean()
    finally:
        s.context.close()


def test_page_on_a_server_with_api_keys(browser, tmp_path):
    """CONVNET_API_KEYS_FILE set: the page and its files load without a key; /models is refused and the page says
    why in the service's words; once a key is typed the models are listed and a drawn digit is answered."""
    key_file = tmp_path / "api-keys.txt"
    made = subprocess.run([sys.executable, "-m", "serving.keys", "--file", str(key_file), "new", "demo-page"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    with started_server(env={"CONVNET_API_KEYS_FILE": str(key_file)}, models=["lenet5"]) as (base, _):
        refused = httpx.get(f"{base}/models", timeout=10)
        assert refused.status_code == 401
        s = Session(browser, base, DESKTOP)
        s.expected_errors = [r"Failed to load resource: .* 401"]
        try:
            s.open()
            assert s.page.inner_text("#models-error") == f"could not list the models: {refused.json()['detail']}"
            assert s.page.locator("#digit-error").is_hidden()  # one notice, not a second misleading one
            s.shot("keys-refused")
            s.page.fill("#api-key", key)
            s.page.keyboard.press("Tab")  # the field's change event: the models are listed again, with the key
            s.page.wait_for_selector("#model:not([disabled])")
            assert s.page.input_value("#model") == "lenet5" and s.page.locator("#models-error").is_hidden()
            assert s.page.locator("#digit-error").is_hidden()
            assert s.draw(ONE) == "done" and s.bars("digit")[0][0] == "1"
            s.check_clean()
        finally:
            s.context.close()
