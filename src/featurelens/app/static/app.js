// featurelens explorer: a thin page over the JSON/PNG API of featurelens.app.http.
// No build step, no dependencies. Receptive-field boxes are computed here from the
// size/stride/padding that /api/info serves (Araujo et al., Distill 2019):
// location u sees input positions [u*stride - padding, u*stride - padding + size - 1].
//
// Security: every API request is a fetch() carrying the X-Featurelens header, which a page
// of another origin cannot send (the server refuses API requests without it when the browser
// sends no Sec-Fetch-Site); images are fetched that way too and shown from blob: URLs. The
// access token, when the server needs one, travels in an HttpOnly cookie set by /?token=...
// Text from the server is only ever put in the page with textContent (never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  input: "dataset:0",
  inputLabel: "",
  layer: null,
  scale: "layer",
  layout: null,      // /api/activations answer for (input, layer, scale)
  sprite: null,      // the loaded sprite image
  channel: null,
  location: null,    // null: the channel's arg-max on the current input
  unit: null,        // /api/unit answer
  method: null,
  style: null,
  tokens: { maps: 0, unit: 0 },
};

// ---- API helpers ------------------------------------------------------------------------
function api(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined) q.set(k, Array.isArray(v) ? v.join(",") : String(v));
  }
  return `/api/${path}?${q.toString()}`;
}

const CLIENT_HEADERS = { "X-Featurelens": "1" };

function apiFetch(url, options = {}) {
  const headers = { ...CLIENT_HEADERS, ...(options.headers || {}) };
  return fetch(url, { ...options, headers, credentials: "same-origin" });
}

// The error message of a failed answer: its JSON "error", else the status line.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function getJSON(url, options) {
  const response = await apiFetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// Load the API image at url into img: fetched with the client header, shown from a blob:
// URL (img.dataset.src keeps the API URL). A newer load into the same element supersedes
// this one, which then resolves to null (so that no promise is left pending and callers can
// tell).
function loadImage(img, url) {
  if (img.supersede) img.supersede();
  const seq = (img.loadSeq = (img.loadSeq || 0) + 1);
  const current = () => seq === img.loadSeq;
  return new Promise((resolve, reject) => {
    img.supersede = () => resolve(null);
    const fail = (message) => {
      if (!current()) return;
      img.supersede = null;
      reject(new Error(message));
    };
    apiFetch(url).then(async (response) => {
      if (!response.ok) return fail(await errorOf(response));
      const blob = await response.blob();
      if (!current()) return;
      const previous = img.objectURL;
      img.objectURL = URL.createObjectURL(blob);
      img.onload = () => {
        if (previous) URL.revokeObjectURL(previous);
        if (!current()) return;
        img.supersede = null;
        resolve(img);
      };
      img.onerror = () => fail(`could not draw ${url}`);
      img.dataset.src = url;
      img.src = img.objectURL;
    }, () => fail(`could not load ${url}`));
  });
}

// Numbers from the API; null stands for NaN (JSON has none).
const num = (v, digits) => (v === null || v === undefined ? "NaN" : v.toPrecision(digits));

let busy = 0;
function status(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.classList.toggle("error", Boolean(isError));
}
async function task(label, fn) {
  busy += 1;
  status(`${label}…`);
  try {
    const result = await fn();
    busy -= 1;
    if (busy === 0) status("");
    return result;
  } catch (err) {
    busy -= 1;
    status(err.message, true);
    return undefined;
  }
}

// ---- geometry ----------------------------------------------------------------------------
function layerInfo() {
  return state.info.layers.find((l) => l.name === state.layer);
}

// Inclusive input region [[r0, r1], [c0, c1]] of a location of the current layer's maps,
// clipped to the input; null when the layer has no receptive-field geometry.
function rfRegion(location) {
  const rf = layerInfo().rf;
  const spatial = state.info.input_shape.slice(1);
  if (!rf) return null;
  const whole = spatial.map((n) => [0, n - 1]);
  if (rf.is_global) return whole;
  // A location of another rank than the field's (a model that changes the rank of its data)
  // gets no box: never the box of another location.
  if (location.length !== rf.size.length) return null;
  return location.map((u, axis) => {
    const first = u * rf.stride[axis] - rf.padding[axis];
    const last = first + rf.size[axis] - 1;
    return [Math.max(first, 0), Math.min(last, spatial[axis] - 1)];
  });
}

function regionText(region) {
  if (!region) {
    const why = layerInfo().rf_error;
    return why ? `no box (${why})` : "no receptive-field geometry for this layer";
  }
  const axes = region.length === 2 ? ["rows", "cols"] : region.map((_, i) => `axis ${i}`);
  return region.map(([a, b], i) => `${axes[i]} ${a}–${b}`).join(", ");
}

// Draw boxes (inclusive input regions) on an overlay canvas laid over an image.
function drawBoxes(canvas, img, boxes) {
  const w = img.clientWidth, h = img.clientHeight;
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const spatial = state.info.input_shape.slice(1);
  const rows = spatial.length === 2 ? spatial[0] : 1;
  const cols = spatial[spatial.length - 1];
  for (const { region, color, fill = true } of boxes) {
    if (!region) continue;
    const [r0, r1] = region.length === 2 ? region[0] : [0, 0];
    const [c0, c1] = region[region.length - 1];
    const sx = w / cols, sy = h / rows;
    ctx.lineWidth = 2;
    ctx.strokeStyle = color;
    if (fill) {
      ctx.fillStyle = color + "33";
      ctx.fillRect(c0 * sx, r0 * sy, (c1 - c0 + 1) * sx, (r1 - r0 + 1) * sy);
    }
    ctx.strokeRect(c0 * sx + 1, r0 * sy + 1, (c1 - c0 + 1) * sx - 2, (r1 - r0 + 1) * sy - 2);
  }
}

let hoverRegion = null;
function redrawOverlays() {
  const unitRegion = state.unit && state.unit.rf ? state.unit.rf.region : null;
  const boxes = [
    { region: unitRegion, color: "#ff4d4d" },
    { region: hoverRegion, color: "#3fd0ff" },
  ];
  drawBoxes($("input-overlay"), $("input-img"), boxes);
  if (!$("unit-body").hidden) {
    // Outline only: a tint would change the projection's colours.
    const outline = [{ region: unitRegion, color: "#ff4d4d", fill: false }];
    drawBoxes($("projection-overlay"), $("projection"), outline);
  }
}

function hover(channel, location) {
  hoverRegion = location ? rfRegion(location) : null;
  $("hover-info").textContent = location
    ? `channel ${channel} at (${location.join(", ")}) sees ${regionText(hoverRegion)}`
    : "";
  redrawOverlays();
}

// Map a pointer position on a canvas showing an (h, w) map to a map location.
// A cell shows the map as drawn (layout.cell): an (L, 1) map is drawn as a row (transposed),
// a long row reduced; locations are always the map's own (layout.map_shape).
function locationAt(canvas, event) {
  const [h, w] = state.layout.map_shape;
  const rect = canvas.getBoundingClientRect();
  const fx = (event.clientX - rect.left) / rect.width, fy = (event.clientY - rect.top) / rect.height;
  const clamp = (v, n) => Math.min(n - 1, Math.max(0, Math.floor(v * n)));
  const dims = state.layout.spatial_dims;
  if (state.layout.transposed) return [clamp(fx, h), 0];
  return dims === 2 ? [clamp(fy, h), clamp(fx, w)] : dims === 1 ? [clamp(fx, w)] : [];
}

// Where a map location is in a drawn cell, as fractions [x0, y0, x1, y1] of its width/height.
function cellFraction(location) {
  const [h, w] = state.layout.map_shape;
  if (!location.length) return [0, 0, 1, 1];
  if (state.layout.transposed) return [location[0] / h, 0, (location[0] + 1) / h, 1];
  if (location.length === 1) return [location[0] / w, 0, (location[0] + 1) / w, 1];
  return [location[1] / w, location[0] / h, (location[1] + 1) / w, (location[0] + 1) / h];
}

// ---- the current input -------------------------------------------------------------------
const isSignal = () => state.info.input_shape.length === 2;  // (channels, samples)

// The picture of an input: a signal's waveforms, else the image.
function inputPicture(input) {
  return api(isSignal() ? "waveform.png" : "input.png", { input });
}

// Play a WAV answer of /api/audio.wav (fetched with the client header, played from blob:).
async function play(params) {
  const response = await apiFetch(api("audio.wav", params));
  if (!response.ok) throw new Error(await errorOf(response));
  const player = $("player");
  if (player.objectURL) URL.revokeObjectURL(player.objectURL);
  player.objectURL = URL.createObjectURL(await response.blob());
  player.src = player.objectURL;
  player.dataset.playing = params.location ? "window" : "input";
  await player.play().catch(() => { /* autoplay refused: the controls are there */ });
}

function playButton(text, title, params) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "play";
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    task("playing", () => play(params));
  });
  return b;
}

async function setInput(input, label, fromPad = false) {
  if (live.running) stopLive();  // another input was chosen: the video no longer drives the page
  state.inputSeq = (state.inputSeq || 0) + 1;
  pad.current = fromPad;
  state.input = input;
  state.inputLabel = label;
  state.location = null;
  $("input-label").textContent = label;
  await task("loading input", () => loadImage($("input-img"), inputPicture(input)));
  redrawOverlays();
  await refreshMaps();
  if (state.channel !== null) await refreshUnit();
}

function datasetInput(index) {
  const n = state.info.data_size;
  const i = Math.min(n - 1, Math.max(0, Number(index) || 0));
  $("dataset-index").value = i;
  return setInput(`dataset:${i}`, `dataset example ${i} of ${n}`);
}

async function upload(file) {
  const result = await task("uploading", () =>
    getJSON(`/api/inputs${$("invert").checked ? "?invert=1" : ""}`, {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    }));
  if (result) await setInput(result.input, `upload ${file.name} (${result.width}×${result.height})`);
}

// ---- drawing an input (light strokes on black, like MNIST) ---------------------------------
// current: the input is the drawing (an answer to an older drawing never replaces an input
// chosen since).
const pad = { drawing: false, last: null, sending: false, dirty: false, count: 0, current: false };

function clearPad() {
  const c = $("pad"), ctx = c.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, c.width, c.height);
}

// Send the drawing as an upload; at most one request in flight, the latest strokes win.
async function sendPad() {
  if (pad.sending) { pad.dirty = true; return; }
  pad.sending = true;
  pad.dirty = false;
  const seq = state.inputSeq;
  const blob = await new Promise((resolve) => $("pad").toBlob(resolve, "image/png"));
  const result = await task("reading the drawing", () =>
    getJSON("/api/inputs", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob }));
  if (result && seq === state.inputSeq) {
    pad.count += 1;
    await setInput(result.input, `drawing (${pad.count} updates)`, true);
  }
  pad.sending = false;
  if (pad.dirty && (pad.current || pad.drawing)) sendPad();
}

function setupPad() {
  const c = $("pad");
  const ctx = c.getContext("2d");
  clearPad();
  const at = (e) => {
    const r = c.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * c.width, ((e.clientY - r.top) / r.height) * c.height];
  };
  let lastSent = 0;
  c.addEventListener("pointerdown", (e) => {
    pad.drawing = true;
    pad.last = at(e);
    c.setPointerCapture(e.pointerId);
  });
  c.addEventListener("pointermove", (e) => {
    if (!pad.drawing) return;
    const p = at(e);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = c.width / 11;  // about MNIST's stroke width at 28 x 28
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...pad.last);
    ctx.lineTo(...p);
    ctx.stroke();
    pad.last = p;
    const now = performance.now();
    if (now - lastSent > 250) { lastSent = now; sendPad(); }  // live, but not every event
  });
  const end = () => { if (pad.drawing) { pad.drawing = false; sendPad(); } };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointercancel", end);
  $("draw").addEventListener("click", () => {
    const show = c.hidden;
    c.hidden = !show;
    $("draw-clear").hidden = !show;
    $("draw").classList.toggle("active", show);
  });
  $("draw-clear").addEventListener("click", () => { clearPad(); sendPad(); });
}

// ---- live video: the camera or a video file, frame by frame -----------------------------
// One request in flight at most: when an answer arrives, the newest frame is grabbed and
// sent; frames the server had no time for are never sent (no queue). The camera stops when
// the button is pressed again, when the page is hidden, or on an error.
const live = {
  running: false, source: null, stream: null, inFlight: 0, maxInFlight: 0, frames: 0,
  times: [], canvas: null, objectURL: null, seq: 0,
};

function liveStatus() {
  const b = document.body.dataset;
  b.camera = live.running ? live.source : "off";
  b.liveFrames = String(live.frames);
  b.maxInFlight = String(live.maxInFlight);
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    status("this browser offers no camera here (it needs https or localhost)", true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    status(`the camera was refused: ${err.message || err.name}`, true);
    return;
  }
  const video = $("camera-video");
  video.srcObject = stream;
  live.stream = stream;
  await startLive(video, "camera");
}

async function startVideoFile(file) {
  stopLive();
  const video = $("camera-video");
  live.objectURL = URL.createObjectURL(file);
  video.src = live.objectURL;
  video.loop = false;
  video.onended = () => stopLive();
  await startLive(video, "video");
}

async function startLive(video, source) {
  try {
    await video.play();
  } catch (err) {
    status(`the video cannot be played: ${err.message || err.name}`, true);
    stopLive();
    return;
  }
  live.running = true;
  live.source = source;
  live.frames = 0;
  live.times = [];
  live.seq += 1;
  $("camera").classList.toggle("active", source === "camera");
  $("camera").textContent = source === "camera" ? "stop camera" : "camera";
  liveStatus();
  pumpFrame(live.seq);
}

function stopLive() {
  const wasRunning = live.running;
  live.running = false;
  live.seq += 1;
  const video = $("camera-video");
  if (live.stream) {
    for (const track of live.stream.getTracks()) track.stop();
    document.body.dataset.cameraTracks = live.stream.getTracks().map((t) => t.readyState).join(",");
    live.stream = null;
  }
  video.pause();
  video.srcObject = null;
  video.removeAttribute("src");
  if (live.objectURL) { URL.revokeObjectURL(live.objectURL); live.objectURL = null; }
  $("camera").classList.remove("active");
  $("camera").textContent = "camera";
  if (wasRunning) $("live-fps").textContent += " (stopped)";
  liveStatus();
}

// Grab the video's current frame as a JPEG, no larger than the model needs.
function grabFrame(video) {
  const [, h, w] = state.info.input_shape;
  const side = 2 * Math.max(h, w, 112);
  const scale = Math.min(1, side / Math.min(video.videoWidth, video.videoHeight));
  const c = live.canvas || (live.canvas = document.createElement("canvas"));
  c.width = Math.max(1, Math.round(video.videoWidth * scale));
  c.height = Math.max(1, Math.round(video.videoHeight * scale));
  c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
  return new Promise((resolve) => c.toBlob(resolve, "image/jpeg", 0.85));
}

async function pumpFrame(seq) {
  if (!live.running || seq !== live.seq || live.inFlight > 0) return;
  const video = $("camera-video");
  if (!video.videoWidth) {  // no frame yet
    setTimeout(() => pumpFrame(seq), 30);
    return;
  }
  live.inFlight += 1;
  live.maxInFlight = Math.max(live.maxInFlight, live.inFlight);
  let answer = null;
  try {
    const blob = await grabFrame(video);
    const params = { layer: state.layer, scale: state.scale, method: state.method,
                     style: state.style, invert: $("invert").checked ? 1 : null };
    if (state.channel !== null) {
      params.channel = state.channel;
      params.location = state.location;
    }
    answer = await getJSON(api("frame", params), {
      method: "POST", headers: { "Content-Type": "image/jpeg" }, body: blob,
    });
    if (seq === live.seq && answer.layout.layer === state.layer) {
      await showFrame(blob, answer);
    }
  } catch (err) {
    status(err.message, true);
    if (seq === live.seq) stopLive();
  } finally {
    live.inFlight -= 1;
    liveStatus();
  }
  if (answer && live.running && seq === live.seq) pumpFrame(seq);  // the newest frame next
}

async function showFrame(blob, answer) {
  live.frames += 1;
  const now = performance.now();
  live.times.push(now);
  while (live.times.length && now - live.times[0] > 2000) live.times.shift();
  const span = (live.times[live.times.length - 1] - live.times[0]) / 1000;
  const fps = live.times.length > 1 && span > 0 ? (live.times.length - 1) / span : 0;
  $("live-fps").textContent = `${live.source}: ${fps.toFixed(1)} fps, ` +
    `model ${(answer.seconds * 1000).toFixed(0)} ms per frame`;
  document.body.dataset.liveFps = fps.toFixed(2);
  // The frame becomes the input picture; the maps and the unit follow it.
  const input = $("input-img");
  const previous = input.objectURL;
  input.objectURL = URL.createObjectURL(blob);
  input.src = input.objectURL;
  if (previous) URL.revokeObjectURL(previous);
  $("input-label").textContent = `live ${live.source} frame ${live.frames}`;
  const sprite = new Image();
  sprite.src = answer.sprite;
  await sprite.decode();
  const sameCells = state.layout && state.layout.channels === answer.layout.channels &&
    state.layout.layer === answer.layout.layer && $("maps").children.length;
  state.layout = answer.layout;
  state.sprite = sprite;
  if (sameCells) {
    for (const tile of $("maps").children) {
      const canvas = tile.querySelector("canvas");
      drawCell(canvas.getContext("2d"), Number(tile.dataset.channel), canvas.width, canvas.height);
    }
  } else {
    drawTiles();
  }
  $("maps").dataset.frame = String(live.frames);
  if (answer.unit && state.channel !== null && answer.unit.channel === state.channel) {
    state.unit = answer.unit;
    const where = answer.unit.location.length ? `(${answer.unit.location.join(", ")})` : "";
    $("unit-title").textContent = `Unit: ${state.layer} channel ${state.channel} at ${where} (live)`;
    $("unit-meta").textContent = `activation ${num(answer.unit.value, 4)} on frame ${live.frames}; ` +
      `receptive field ${answer.unit.rf ? regionText(answer.unit.rf.region) : "unknown"}`;
    drawUnitMap();
    $("projection").src = answer.projection;  // a data: URL of this frame's projection
    $("projection").dataset.frame = String(live.frames);
    redrawOverlays();
  }
}

function setupLive() {
  const imageModel = state.info.input_shape.length === 3 && [1, 3].includes(state.info.input_shape[0]);
  $("live-controls").hidden = !imageModel;
  $("camera").addEventListener("click", () => {
    if (live.running && live.source === "camera") stopLive();
    else { stopLive(); startCamera(); }
  });
  $("video-file").addEventListener("change", (e) => {
    if (e.target.files.length) startVideoFile(e.target.files[0]);
    e.target.value = "";
  });
  document.addEventListener("visibilitychange", () => { if (document.hidden) stopLive(); });
  window.addEventListener("pagehide", stopLive);
  liveStatus();
}

// ---- the layer's maps --------------------------------------------------------------------
async function refreshMaps() {
  const token = ++state.tokens.maps;
  const params = { input: state.input, layer: state.layer, scale: state.scale };
  const layout = await task("computing activations", () => getJSON(api("activations", params)));
  if (!layout || token !== state.tokens.maps) return;
  const img = new Image();
  const sprite = await task("drawing maps", () => loadImage(img, api("activations.png", params)));
  if (!sprite || token !== state.tokens.maps) return;
  state.layout = layout;
  state.sprite = sprite;
  drawTiles();
  const rf = layerInfo().rf;
  $("layer-meta").textContent =
    `${layout.channels} channels, maps ${layout.map_shape.join("×")}` +
    (rf ? `, receptive field ${rf.size.join("×")} stride ${rf.stride.join("×")}` +
          ` padding ${rf.padding.join("×")}${rf.is_global ? " (global)" : ""}` : "") +
    `, values ${num(layout.min, 3)} … ${num(layout.max, 3)}`;
  $("maps").dataset.input = state.input;
  $("maps").dataset.layer = state.layer;
}

function drawCell(ctx, channel, width, height) {
  const { cols, gap, cell: [h, w] } = state.layout;
  const r = Math.floor(channel / cols), c = channel % cols;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(state.sprite, c * (w + gap), r * (h + gap), w, h, 0, 0, width, height);
}

function drawTiles() {
  const maps = $("maps");
  maps.textContent = "";
  const { channels, cell: [h, w] } = state.layout;
  maps.classList.toggle("rows", h === 1 && w > 16);  // 1-D maps: one row per channel
  const zoom = Math.max(1, Math.round(64 / Math.max(h, w)));
  for (let k = 0; k < channels; k++) {
    const tile = document.createElement("div");
    tile.className = "tile" + (k === state.channel ? " selected" : "");
    tile.dataset.channel = k;
    tile.title = `channel ${k}: max ${state.layout.channel_max[k]}`;
    const canvas = document.createElement("canvas");
    canvas.width = w * zoom;
    canvas.height = h * zoom;
    if (h < w / 4) canvas.style.height = "16px";
    drawCell(canvas.getContext("2d"), k, canvas.width, canvas.height);
    const label = document.createElement("span");
    label.textContent = k;
    tile.append(canvas, label);
    canvas.addEventListener("mousemove", (e) => hover(k, locationAt(canvas, e)));
    canvas.addEventListener("mouseleave", () => hover(null, null));
    tile.addEventListener("click", () => selectChannel(k));
    maps.append(tile);
  }
}

// ---- the selected unit -------------------------------------------------------------------
async function selectChannel(k) {
  state.channel = k;
  state.location = null;
  for (const t of document.querySelectorAll(".tile")) {
    t.classList.toggle("selected", Number(t.dataset.channel) === k);
  }
  $("unit-hint").hidden = true;
  $("unit-body").hidden = false;
  // Live: the next frame's answer brings the unit and its projection.
  await Promise.all([live.running ? null : refreshUnit(), refreshTop(), refreshZF()]);
}

async function refreshUnit() {
  const token = ++state.tokens.unit;
  const params = {
    input: state.input, layer: state.layer, channel: state.channel, location: state.location,
  };
  const unit = await task("locating unit", () => getJSON(api("unit", params)));
  if (!unit || token !== state.tokens.unit) return;
  state.unit = unit;
  const where = unit.location.length ? `(${unit.location.join(", ")})` : "(no spatial axes)";
  $("unit-title").textContent = `Unit: ${state.layer} channel ${state.channel} at ${where}`;
  $("unit-meta").textContent =
    `activation ${num(unit.value, 4)} ${state.location ? "at the chosen location" : "(arg-max on this input)"}; ` +
    `receptive field ${unit.rf ? regionText(unit.rf.region) : `unknown${unit.rf_error ? ` (${unit.rf_error})` : ""}`}`;
  drawUnitMap();
  redrawOverlays();
  $("play-field").hidden = !(state.info.sample_rate && isSignal() && unit.rf && unit.location.length);
  const projection = api("projection.png", {
    input: state.input, layer: state.layer, channel: state.channel, location: unit.location,
    method: state.method, style: state.style,
  });
  await task("projecting", () => loadImage($("projection"), projection));
  if (token === state.tokens.unit) redrawOverlays();
}

function drawUnitMap() {
  const canvas = $("unit-map");
  const [h, w] = state.layout.cell;
  const zoom = Math.max(1, Math.ceil(200 / Math.max(h, w)));
  canvas.width = w * zoom;
  canvas.height = Math.max(h * zoom, h === 1 ? 24 : 0);  // a row is drawn 24 pixels tall
  const ctx = canvas.getContext("2d");
  drawCell(ctx, state.channel, canvas.width, canvas.height);
  if (state.unit && state.unit.location.length) {
    const [x0, y0, x1, y1] = cellFraction(state.unit.location);
    const W = canvas.width, H = canvas.height;
    ctx.strokeStyle = "#ff4d4d";
    ctx.lineWidth = Math.max(1, zoom / 6);
    ctx.strokeRect(x0 * W, y0 * H, Math.max(2, (x1 - x0) * W), Math.max(2, (y1 - y0) * H));
  }
}

async function refreshTop() {
  const channel = state.channel;
  const result = await task("reading top examples", () =>
    getJSON(api("top", { layer: state.layer, channel })));
  if (!result || channel !== state.channel) return;
  drawHistogram(result.labels);
  const box = $("top-hits");
  box.textContent = "";
  const audio = Boolean(state.info.sample_rate) && isSignal();
  for (const hit of result.hits) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    const input = `dataset:${hit.index}`;
    loadImage(img, inputPicture(input)).catch((err) => status(err.message, true));
    if (isSignal()) img.classList.add("signal");
    img.alt = `example ${hit.index}`;
    img.title = `example ${hit.index}: score ${num(hit.score, 4)} at (${hit.location.join(", ")})`;
    const cap = document.createElement("figcaption");
    cap.textContent = `#${hit.index}`;
    if (hit.label !== null && hit.label !== undefined) {
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = String(hit.label);  // text, never markup
      cap.append(" ", label);
    }
    fig.append(img, cap);
    if (audio) {
      const layer = result.layer;
      fig.append(playButton("▶", `play example ${hit.index}`, { input }));
      if (hit.location.length) {
        fig.append(playButton("▶ field", `play what the unit sees of example ${hit.index}`,
                              { input, layer, location: hit.location }));
      }
    }
    fig.addEventListener("click", () => {
      $("dataset-index").value = hit.index;
      datasetInput(hit.index);
    });
    box.append(fig);
  }
}

// The channel's top-k spread over labels, as bars with text labels.
function drawHistogram(histogram) {
  const box = $("label-hist");
  box.textContent = "";
  box.hidden = !histogram;
  if (!histogram) return;
  const most = Math.max(1, ...histogram.counts);
  histogram.bins.forEach((bin, i) => {
    const row = document.createElement("div");
    row.className = "hist-row";
    const name = document.createElement("span");
    name.className = "hist-label";
    name.textContent = Array.isArray(bin) ? `${num(bin[0], 4)} – ${num(bin[1], 4)}` : String(bin);
    const bar = document.createElement("span");
    bar.className = "hist-bar";
    bar.style.width = `${(100 * histogram.counts[i]) / most}%`;
    const count = document.createElement("span");
    count.className = "hist-count";
    count.textContent = String(histogram.counts[i]);
    row.append(name, bar, count);
    box.append(row);
  });
  if (histogram.missing) {
    const row = document.createElement("div");
    row.className = "hist-row";
    row.textContent = `${histogram.missing} without a label (NaN)`;
    box.append(row);
  }
}

async function refreshZF() {
  const url = api("zf.png", {
    layer: state.layer, channel: state.channel, method: state.method, style: state.style,
  });
  await task("drawing the Zeiler–Fergus grid", () => loadImage($("zf"), url));
}

// ---- setup -------------------------------------------------------------------------------
function fillSelect(select, values, current) {
  select.textContent = "";
  for (const v of values) {
    const o = document.createElement("option");
    o.value = v;
    o.textContent = v;
    select.append(o);
  }
  select.value = current;
}

function setMethod(method) {
  state.method = method;
  for (const b of $("methods").children) b.classList.toggle("active", b.dataset.method === method);
}

async function init() {
  // Opened as /?token=...: the server has set the token cookie; keep the token out of the
  // address bar and the history.
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);
  }
  const info = await task("loading", () => getJSON("/api/info"));
  if (!info) return;
  state.info = info;
  const model = info.model ? info.model.spec || JSON.stringify(info.model) : "a Python model";
  const data = info.data ? info.data.spec || JSON.stringify(info.data) : "Python data";
  $("about").textContent =
    `${model} on ${data} (${info.data_size} examples, input ${info.input_shape.join("×")})`;
  state.layer = info.layers[0].name;
  fillSelect($("layer"), info.layers.map((l) => l.name), state.layer);
  fillSelect($("scale"), info.scales, state.scale);
  state.style = info.styles[0];
  fillSelect($("style"), info.styles, state.style);
  for (const o of $("style").options) o.title = info.style_help[o.value] || "";
  for (const m of info.methods) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = m;
    b.title = info.method_help[m] || "";
    b.dataset.method = m;
    b.addEventListener("click", () => {
      setMethod(m);
      if (state.channel !== null) { if (!live.running) refreshUnit(); refreshZF(); }
    });
    $("methods").append(b);
  }
  setMethod(info.methods.includes("deconvnet") ? "deconvnet" : info.methods[0]);
  $("dataset-index").max = info.data_size - 1;
  $("play-input").hidden = !(info.sample_rate && isSignal());
  $("input-img").classList.toggle("signal", isSignal());
  $("play-input").addEventListener("click", () => task("playing", () => play({ input: state.input })));
  $("play-field").addEventListener("click", () => task("playing", () => play({
    input: state.input, layer: state.layer, location: state.unit.location,
  })));
  if (info.other_activations === "gradient") {
    $("other-note").textContent = "deconvnet and guided pass activations that are not " +
      "rectifiers (GELU, SiLU, ...) as the plain gradient (--other-activations gradient)";
  }

  $("layer").addEventListener("change", async (e) => {
    state.layer = e.target.value;
    state.channel = null;
    state.unit = null;
    $("unit-body").hidden = true;
    $("unit-hint").hidden = false;
    $("unit-title").textContent = "Unit";
    redrawOverlays();
    if (!live.running) await refreshMaps();  // live: the next frame brings the new layer
  });
  $("scale").addEventListener("change", async (e) => {
    state.scale = e.target.value;
    await refreshMaps();
    if (state.channel !== null) drawUnitMap();
  });
  $("style").addEventListener("change", (e) => {
    state.style = e.target.value;
    if (state.channel !== null) { if (!live.running) refreshUnit(); refreshZF(); }
  });
  $("dataset-index").addEventListener("change", (e) => datasetInput(e.target.value));
  $("prev").addEventListener("click", () => datasetInput(Number($("dataset-index").value) - 1));
  $("next").addEventListener("click", () => datasetInput(Number($("dataset-index").value) + 1));
  $("upload").addEventListener("change", (e) => {
    if (e.target.files.length) upload(e.target.files[0]);
    e.target.value = "";
  });
  const unitMap = $("unit-map");
  unitMap.addEventListener("mousemove", (e) => hover(state.channel, locationAt(unitMap, e)));
  unitMap.addEventListener("mouseleave", () => hover(null, null));
  unitMap.addEventListener("click", (e) => {
    state.location = locationAt(unitMap, e);
    if (!live.running) refreshUnit();
  });
  $("argmax").addEventListener("click", () => {
    state.location = null;
    if (!live.running) refreshUnit();
  });
  window.addEventListener("resize", redrawOverlays);
  // Arrow keys step through the dataset (when no form field has the focus).
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
    const step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    if (step) datasetInput(Number($("dataset-index").value) + step);
  });
  setupPad();
  setupLive();
  await datasetInput(0);
  document.body.dataset.ready = "1";
}

init();
