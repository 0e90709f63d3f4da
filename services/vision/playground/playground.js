// HERO Serve playground: plain JavaScript over the OpenAI-compatible API of this server.
// GET /v1/models (methods and defaults), POST /v1/chat/completions (streamed answer and
// usage.hero), POST /v1/hero/layout (where the kept tokens sit). The token typed into
// the page stays in this page's memory: it is sent with each call and stored nowhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { card: null, file: null, image: null, bitmap: null };
const PANEL = 360;

// What each status of the API means to someone using this page.
const STATUS_TEXT = {
  400: "The server could not use this image or request",
  401: "Not authenticated: enter the API token above (it stays in this page only)",
  403: "This token may not use the API",
  404: "Not found",
  413: "The image is too large for this server",
  429: "The server is overloaded: try again shortly",
  503: "The service is unavailable (starting or draining): try again shortly",
  504: "The answer took longer than its deadline",
};
const TYPE_STATUS = {
  invalid_request_error: 400, authentication_error: 401, permission_error: 403,
  not_found_error: 404, rate_limit_error: 429, service_unavailable_error: 503,
  timeout_error: 504,
};

function errorText(status, error, retryAfter) {
  let text = STATUS_TEXT[status] || `The server failed (HTTP ${status})`;
  if (retryAfter) text += ` (retry after ${retryAfter} s)`;
  const detail = error && error.message ? `: ${error.message}` : "";
  return `${text}. HTTP ${status}${detail}`;
}

function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function clearError() { $("error").textContent = ""; $("error").hidden = true; }

async function responseError(response) {
  let error = null;
  try { error = (await response.json()).error; } catch (_) { /* not JSON */ }
  return errorText(response.status, error, response.headers.get("retry-after"));
}

async function api(path, body) {
  const headers = {};
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                       body: body === undefined ? undefined : JSON.stringify(body) });
}

function uploadFailed() {
  const limit = state.card && state.card.hero.max_image_bytes;
  if (limit && state.file && state.file.size > limit) {
    return `${STATUS_TEXT[413]}: ${state.file.size} bytes, above its limit of ${limit} ` +
           "bytes (the server closed the upload).";
  }
  return "The server could not be reached.";
}

// ---- the server's model card: methods and defaults -----------------------------------
async function loadModels() {
  let response;
  try { response = await api("/v1/models"); } catch (_) { showError(uploadFailed()); return false; }
  if (!response.ok) { showError(await responseError(response)); return false; }
  const card = (await response.json()).data[0];
  state.card = card;
  const select = $("method");
  select.replaceChildren(...card.hero.methods.map((name) => new Option(name, name)));
  select.value = card.hero.default_method;
  if (!$("retention").value) $("retention").value = card.hero.default_retention;
  clearError();
  return true;
}

// ---- the image ------------------------------------------------------------------------
function pick(file) {
  if (!file) return;
  clearError();
  state.file = file; state.image = null; state.bitmap = null;
  $("drop-text").textContent = `${file.name} (${(file.size / 1024).toFixed(0)} KiB)`;
  const reader = new FileReader();
  reader.onload = () => { state.image = reader.result; };
  reader.readAsDataURL(file);
  createImageBitmap(file).then((bitmap) => {
    state.bitmap = bitmap;
    drawPanels(null);
  }).catch(() => { state.bitmap = null; });
}

async function imageData() {
  while (state.file && state.image === null) await new Promise((r) => setTimeout(r, 20));
  return state.image;
}

// ---- the kept-token picture -----------------------------------------------------------
function fit(canvas) {
  const b = state.bitmap;
  const scale = PANEL / Math.max(b.width, b.height);
  canvas.width = Math.max(1, Math.round(b.width * scale));
  canvas.height = Math.max(1, Math.round(b.height * scale));
  return [canvas.width, canvas.height];
}

// The image dimmed except inside `boxes` (fractions of the image), as `hero prune --viz`.
function panel(canvas, boxes) {
  const ctx = canvas.getContext("2d");
  const [w, h] = fit(canvas);
  ctx.drawImage(state.bitmap, 0, 0, w, h);
  if (!boxes) return ctx;
  ctx.fillStyle = "rgba(0, 0, 0, 0.75)";
  ctx.fillRect(0, 0, w, h);
  ctx.save();
  ctx.beginPath();
  for (const [x0, y0, x1, y1] of boxes) ctx.rect(x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h);
  ctx.clip();
  ctx.drawImage(state.bitmap, 0, 0, w, h);
  ctx.restore();
  return ctx;
}

function label(ctx, text, x, y) {
  ctx.font = "bold 13px system-ui, sans-serif";
  const width = ctx.measureText(text).width + 8;
  ctx.fillStyle = "rgba(0, 0, 0, 0.7)";
  ctx.fillRect(x, y, width, 18);
  ctx.fillStyle = "#ffc800";
  ctx.fillText(text, x + 4, y + 13);
}

function drawPanels(layout) {
  if (!state.bitmap) return;
  panel($("thumb"), layout && layout.thumbnail.tokens);
  const ctx = panel($("tiles"), layout && layout.tile_tokens);
  if (!layout) {
    $("picture-kept").textContent = "";
    $("thumb-caption").textContent = "thumbnail";
    $("tiles-caption").textContent = "tiles";
    return;
  }
  const [w, h] = [ctx.canvas.width, ctx.canvas.height];
  ctx.strokeStyle = "#00a0ff";
  ctx.lineWidth = 2;
  for (const tile of layout.tiles) {
    const [x0, y0, x1, y1] = tile.box;
    ctx.strokeRect(x0 * w + 1, y0 * h + 1, (x1 - x0) * w - 2, (y1 - y0) * h - 2);
    label(ctx, `tile ${tile.tile}: ${tile.kept}`, x0 * w + 4, y0 * h + 4);
  }
  label($("thumb").getContext("2d"), `budget ${layout.thumbnail.kept}`, 4, 4);
  const tiles = layout.tiles.reduce((sum, t) => sum + t.kept, 0);
  const kept = layout.thumbnail.kept + tiles;
  const picture = $("picture-kept");
  picture.dataset.kept = kept;
  picture.textContent = `${kept} of ${layout.hero.visual_tokens_total} ` +
                        `(${layout.method} at retention ${layout.retention})`;
  $("thumb-caption").textContent =
    `thumbnail: ${layout.thumbnail.kept} of ${layout.thumbnail.of} tokens kept`;
  $("tiles-caption").textContent =
    `tiles ${layout.grid.rows}×${layout.grid.cols}: ${tiles} tokens kept`;
}

async function showLayout(imageId, question, hero) {
  const response = await api("/v1/hero/layout",
                             { image_url: `hero-image://${imageId}`, question, hero });
  if (!response.ok) { showError(await responseError(response)); return; }
  drawPanels(await response.json());
}

// ---- the figures ------------------------------------------------------------------------
function setFigure(id, text) { $(id).textContent = text; }

function acceptedFigures(hero) {
  setFigure("fig-kept", `${hero.visual_tokens_kept} of ${hero.visual_tokens_total} ` +
            `(${(100 * hero.visual_tokens_kept / hero.visual_tokens_total).toFixed(1)}%)`);
  setFigure("fig-cache", hero.cache_hit ? "hit" : "miss");
}

function usageFigures(usage, pageTtft) {
  const hero = usage.hero;
  acceptedFigures(hero);
  setFigure("fig-vision", `${hero.vision_ms.toFixed(1)} ms (queue ${hero.queue_ms.toFixed(1)} ms)`);
  setFigure("fig-ttft", `${hero.ttft_ms.toFixed(0)} ms` +
            (pageTtft ? ` (${pageTtft.toFixed(0)} ms in this page)` : ""));
  setFigure("fig-speed", `${hero.decode_tokens_per_s.toFixed(1)} tokens/s ` +
            `(${usage.completion_tokens} tokens)`);
  setFigure("fig-bytes", `${(hero.bytes_sent / 1024).toFixed(1)} KiB to the language model`);
}

// ---- asking -------------------------------------------------------------------------------
async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function ask() {
  clearError();
  if (!state.card && !(await loadModels())) return;
  if (!state.file) { showError("Pick or drop an image first."); return; }
  const question = $("question").value;
  const hero = { method: $("method").value, retention: Number($("retention").value) || 0 };
  $("ask").disabled = true;
  $("answer").textContent = "";
  for (const id of ["fig-kept", "fig-cache", "fig-vision", "fig-ttft", "fig-speed", "fig-bytes"]) {
    setFigure(id, "…");
  }
  const started = performance.now();
  let pageTtft = 0;
  try {
    const body = {
      model: state.card.id, stream: true, stream_options: { include_usage: true },
      max_tokens: 64, hero,
      messages: [{ role: "user", content: [
        { type: "image_url", image_url: { url: await imageData() } },
        { type: "text", text: question }] }],
    };
    let response;
    try { response = await api("/v1/chat/completions", body); } catch (_) {
      showError(uploadFailed()); return;
    }
    if (!response.ok) { showError(await responseError(response)); return; }
    await readStream(response, (chunk) => {
      if (chunk.error) {
        showError(errorText(TYPE_STATUS[chunk.error.type] || 500, chunk.error, null));
        return;
      }
      if (chunk.hero) {
        acceptedFigures(chunk.hero);
        showLayout(chunk.hero.image_id, question, hero).catch(() => showError(uploadFailed()));
      }
      const text = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (text) {
        pageTtft = pageTtft || performance.now() - started;
        $("answer").textContent += text;
      }
      if (chunk.usage) usageFigures(chunk.usage, pageTtft);
    });
  } catch (_) {
    showError("The answer was cut off: the connection to the server ended.");
  } finally {
    $("ask").disabled = false;
  }
}

// ---- wiring -------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pick(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
  $("token").addEventListener("change", loadModels);
  $("ask").addEventListener("click", ask);
  loadModels();
});
