// The demo page. Talks only to its own origin: GET /models, POST /classify (the public API, unchanged) and
// POST /model_input (the exact tensor the service's preprocessing made, as a PNG). Keeps nothing: no storage,
// no cookies; the API key lives in this tab's memory only.
"use strict";

const TOP_K = 5;
const DIGIT_MODEL = "lenet5";
const PEN_WIDTH = 18; // in the 280×280 drawing: a digit drawn ~200 px tall gets MNIST's ~2 px stroke once fitted to 20 px

const $ = (id) => document.getElementById(id);
// seq: the latest request per panel, so a slow answer never overwrites a newer one.
const state = { cards: {}, seq: { photo: 0, digit: 0 } };

// ---- talking to the service ---------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The service's own words for a failure: its JSON `detail`, or the status line when the body is not ours.
async function failure(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.detail || body.error || "";
  } catch (_) { /* not JSON: a proxy or BentoML itself answered */ }
  return new Error(detail || `the server answered ${response.status} ${response.statusText}`.trim());
}

async function call(path, init) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init && init.headers) }, cache: "no-store" });
  } catch (err) {
    throw new Error(`the service did not answer (${err.message}); is it still running?`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

function imageForm(blob, filename) {
  const form = new FormData();
  form.append("image", blob, filename);
  return form;
}

// /classify and /model_input for the same bytes, in parallel; resolves to {body, serverMs, roundTripMs, input}.
async function classify(blob, filename, model) {
  const query = `model=${encodeURIComponent(model)}`;
  const t0 = performance.now();
  const [classified, modelInput] = await Promise.all([
    call(`classify?${query}&top_k=${TOP_K}`, { method: "POST", body: imageForm(blob, filename) })
      .then(async (r) => ({ body: await r.json(), serverMs: serverTiming(r), roundTripMs: performance.now() - t0 })),
    call(`model_input?${query}`, { method: "POST", body: imageForm(blob, filename) }).then((r) => r.blob()),
  ]);
  return { ...classified, input: modelInput };
}

function serverTiming(response) {
  const match = /(?:^|,)\s*app;dur=([0-9.]+)/.exec(response.headers.get("Server-Timing") || "");
  return match ? Number(match[1]) : null;
}

// Count every answer a panel shows (result or error), so a test can wait for the next one.
function answered(panel, outcome) {
  panel.dataset.state = outcome;
  panel.dataset.answers = String(Number(panel.dataset.answers || 0) + 1);
}

// ---- drawing results ----------------------------------------------------------------------------------------

function showBars(list, predictions) {
  list.replaceChildren(...predictions.map((p) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    label.title = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(p.score * 100).toFixed(1)}%`; // CSSOM, which the CSP allows (no inline style attribute)
    track.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)}%`;
    item.append(label, track, score);
    return item;
  }));
}

function showLatency(el, result) {
  const server = result.serverMs === null ? "n/a" : `${result.serverMs.toFixed(0)} ms`;
  el.textContent = `${result.body.model} v${result.body.version} (${result.body.weights}) · ` +
    `server ${server} · round trip ${result.roundTripMs.toFixed(0)} ms`;
}

// Draw a picture into a canvas at its own pixel size (CSS scales it); no <img>, so no blob: URL in the CSP.
async function paint(canvas, blob, sizeLabel) {
  const bitmap = await createImageBitmap(blob);
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  if (sizeLabel) sizeLabel.textContent = `${bitmap.width}×${bitmap.height}`;
  bitmap.close();
}

function clearCanvas(canvas) {
  canvas.width = 1;
  canvas.height = 1;
}

function showError(el, err) {
  el.textContent = err ? err.message : "";
  el.hidden = !err;
}

// A panel's ("photo" or "digit") answer: bars, latency and the model's input, or the service's error.
async function showAnswer(name, seq, pending) {
  const el = (part) => $(`${name}-${part}`);
  try {
    const result = await pending;
    if (seq !== state.seq[name]) return; // a newer request superseded this one
    showError(el("error"), null);
    showBars(el("bars"), result.body.predictions);
    showLatency(el("latency"), result);
    await paint(el("model-input"), result.input, el("model-input-size"));
    answered($(name), "done");
  } catch (err) {
    if (seq !== state.seq[name]) return;
    el("bars").replaceChildren();
    showError(el("error"), err);
    answered($(name), "error");
  }
}

// ---- models and the banner ----------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const body = await (await call("models")).json();
    state.cards = Object.fromEntries(body.models.map((c) => [c.name, c]));
    select.replaceChildren(...body.models.map((c) => {
      const option = document.createElement("option");
      option.value = c.name;
      option.textContent = `${c.name} v${c.version} · ${c.weights}`;
      option.selected = c.name === body.default_model;
      return option;
    }));
    select.disabled = false;
    showError($("models-error"), null);
  } catch (err) {
    showError($("models-error"), new Error(`could not list the models: ${err.message}`));
  }
  showModel();
  // Only a listing without lenet5 says the panel cannot work; a refused listing is reported once, above.
  const noDigitModel = Object.keys(state.cards).length > 0 && !state.cards[DIGIT_MODEL];
  $("digit").dataset.state = noDigitModel ? "error" : "idle";
  showError($("digit-error"), noDigitModel
    ? new Error(`the digit panel needs the ${DIGIT_MODEL} model, which this server does not list`) : null);
}

function showModel() {
  const card = state.cards[$("model").value];
  $("untrained-banner").hidden = !(card && card.weights === "untrained-demo");
  $("model-info").textContent = card
    ? `${card.architecture || card.name} · ${card.num_classes} classes · input ${card.input.shape.slice(1).join("×")}`
    : "";
}

// ---- photo --------------------------------------------------------------------------------------------------

async function classifyPhoto(file) {
  if (!file) return;
  const seq = ++state.seq.photo;
  $("photo").dataset.state = "busy";
  showError($("photo-error"), null);
  $("photo-bars").replaceChildren();
  $("photo-latency").textContent = "";
  clearCanvas($("photo-model-input"));
  $("photo-model-input-size").textContent = "";
  $("photo-original-size").textContent = "";
  try {
    await paint($("photo-original"), file, $("photo-original-size"));
  } catch (_) {
    clearCanvas($("photo-original")); // the browser cannot show it (e.g. not an image): the service will say why
    $("photo-original-size").textContent = "(no preview)";
  }
  await showAnswer("photo", seq, classify(file, file.name || "pasted-image", $("model").value));
}

function setUpPhoto() {
  const input = $("photo-file");
  const zone = $("drop-zone");
  input.addEventListener("change", () => classifyPhoto(input.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    classifyPhoto(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])][0];
    if (file) {
      e.preventDefault();
      classifyPhoto(file);
    }
  });
  // A server with API keys refuses /models until a key is given: list the models again once there is one.
  $("api-key").addEventListener("change", () => { if (!Object.keys(state.cards).length) loadModels(); });
  $("model").addEventListener("change", () => {
    showModel();
    if (input.files[0]) classifyPhoto(input.files[0]);
  });
}

// ---- digit --------------------------------------------------------------------------------------------------

function setUpDigit() {
  const canvas = $("digit-canvas");
  const ctx = canvas.getContext("2d");
  let drawing = false;

  function blank() {
    ctx.fillStyle = "#fff"; // dark ink on white; the service's digit recipe inverts and normalises it like MNIST
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  function point(e) {
    const rect = canvas.getBoundingClientRect();
    return [(e.clientX - rect.left) * (canvas.width / rect.width), (e.clientY - rect.top) * (canvas.height / rect.height)];
  }
  blank();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = "#000";
  ctx.lineWidth = PEN_WIDTH;

  canvas.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    const [x, y] = point(e);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x, y); // a tap leaves a dot
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const [x, y] = point(e);
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    canvas.toBlob((png) => classifyDigit(png), "image/png");
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  $("digit-clear").addEventListener("click", () => {
    state.seq.digit++; // answers still in flight are for the old drawing
    blank();
    $("digit-bars").replaceChildren();
    $("digit-latency").textContent = "";
    clearCanvas($("digit-model-input"));
    $("digit-model-input-size").textContent = "";
    showError($("digit-error"), null);
    $("digit").dataset.state = "idle";
  });
}

async function classifyDigit(png) {
  const seq = ++state.seq.digit;
  $("digit").dataset.state = "busy";
  await showAnswer("digit", seq, classify(png, "digit.png", DIGIT_MODEL));
}

document.addEventListener("DOMContentLoaded", () => {
  setUpPhoto();
  setUpDigit();
  loadModels().then(() => { document.body.dataset.ready = "true"; });
});
