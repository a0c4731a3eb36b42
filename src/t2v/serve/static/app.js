// t2v page: queue a generation through the REST API, follow its server-sent events, show the
// video, and list past generations. Plain JS, no build step, nothing loaded from elsewhere.
// The options form is built from the served model's knobs (GET /v1/models): their defaults
// and limits are stated once, by the model, never typed here.
// Events and videos are read with fetch() (not EventSource or <video src>) so that the API key,
// when the server needs one, travels in the Authorization header and never in a URL.
"use strict";

const KEY_STORAGE = "t2v-api-key";
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const KNOBS = ["seed", "steps", "guidance", "frames", "width", "height", "fps"];
const $ = (id) => document.getElementById(id);

let current = null;        // the job shown in the "Current video" section
let following = null;      // AbortController of the events stream being read
let resultUrl = null;      // object URL of the video shown, revoked when replaced
let historyAfter = null;   // last_id of the history list, while it has more
let modelId = null;        // the model the form was built for: the server's default

class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  const body = await response.json().catch(() => ({}));
  const message = body.error?.message || `The server answered ${response.status}.`;
  if (response.status === 401) askForKey(message);
  throw new ApiError(message);
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("api-key").focus();
}

// The first value a knob allows: offset + k * multiple, at or above its minimum.
function first(knob) {
  return knob.offset + Math.ceil((knob.min - knob.offset) / knob.multiple) * knob.multiple;
}

function showKnobs(model) {
  const knobs = model.knobs;
  $("prompt").maxLength = knobs.max_prompt_chars;
  $("negative-row").hidden = !knobs.negative_prompt;
  for (const name of KNOBS) {
    const knob = knobs[name], input = $(name);
    const whole = "multiple" in knob;
    input.min = whole ? first(knob) : knob.min;
    input.max = knob.max;
    if (whole) input.step = knob.multiple;
    input.placeholder = String(knob.default);
    input.disabled = knob.min === knob.max;  // fixed by the model: shown, not asked
    if (input.disabled) input.value = knob.default;
  }
  $("format").replaceChildren(...knobs.formats.map((format) => {
    const option = document.createElement("option");
    option.value = format;
    option.textContent = format.toUpperCase();
    return option;
  }));
  const seconds = knobs.frames.default / knobs.fps.default;
  $("model").textContent = `Model ${model.id}: by default ${knobs.frames.default} frames of `
    + `${knobs.width.default}×${knobs.height.default} at ${knobs.fps.default} fps `
    + `(${Math.round(seconds * 100) / 100} s).`;
}

async function loadModel() {
  const { data } = await (await api("/v1/models")).json();
  if (data.length === 0) {  // an API node whose workers are not running (yet)
    $("model").textContent = "No model is being served right now; try again in a minute.";
    return;
  }
  modelId = data[0].id;
  showKnobs(data[0]);
}

function readOptions() {
  const body = { prompt: $("prompt").value, format: $("format").value };
  if (modelId) body.model = modelId;  // the knobs below are this model's
  const negative = $("negative_prompt").value.trim();
  if (negative && !$("negative-row").hidden) body.negative_prompt = negative;
  for (const name of KNOBS) {
    const input = $(name);
    if (!input.disabled && input.value.trim() !== "") body[name] = Number(input.value);
  }
  return body;
}

function describe(job) {
  switch (job.status) {
    case "queued": return "Queued: waiting for the jobs ahead of it.";
    case "in_progress": {
      if (!job.total_steps) return "Starting…";
      const eta = job.eta_seconds == null ? "" : `, about ${Math.ceil(job.eta_seconds)} s left`;
      return `Step ${job.step} of ${job.total_steps}${eta}.`;
    }
    case "completed": return "Done.";
    case "failed": return `Failed: ${job.error?.message}`;
    default: return "Cancelled.";
  }
}

// How the model read the prompt, when it read it differently, and what it said about it.
function showReading(job) {
  const revised = job.revised_prompt && job.revised_prompt !== job.prompt;
  $("reading").hidden = !revised;
  $("reading").textContent = revised ? `Read as: ${job.revised_prompt}` : "";
  const warnings = job.warnings || [];
  $("warnings").hidden = warnings.length === 0;
  $("warnings").replaceChildren(...warnings.map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
}

function showStatus(job) {
  $("job").hidden = false;
  showReading(job);
  $("status").textContent = describe(job);
  $("status").classList.toggle("error", job.status === "failed");
  $("progress").value = job.progress;  // 0 to 100
  $("cancel").hidden = FINISHED.has(job.status);
}

function showError(message) {
  $("job").hidden = false;
  showReading({});
  $("status").textContent = message;
  $("status").classList.add("error");
}

// Server-sent events, parsed from a fetch() body: blocks separated by a blank line.
async function follow(job) {
  following?.abort();
  following = new AbortController();
  const response = await api(job.events_url, { signal: following.signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim()).join("\n");
      buffer = buffer.slice(end + 2);
      if (!data) continue;
      job = JSON.parse(data);
      showStatus(job);
      if (FINISHED.has(job.status)) return job;
    }
  }
  // The stream ended early (the server restarted): ask for the job until it has finished.
  for (let i = 0; i < 3600 && !FINISHED.has(job.status); i++) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    job = await (await api(`/v1/videos/${job.id}`)).json();
    showStatus(job);
  }
  return job;
}

async function showVideo(job) {
  const blob = await (await api(job.content_url)).blob();
  if (resultUrl) URL.revokeObjectURL(resultUrl);
  resultUrl = URL.createObjectURL(blob);
  const media = document.createElement(job.format === "gif" ? "img" : "video");
  media.src = resultUrl;
  if (job.format === "gif") {
    media.alt = job.prompt;
  } else {
    Object.assign(media, { controls: true, autoplay: true, loop: true, muted: true });
    media.playsInline = true;
    media.setAttribute("aria-label", job.prompt);
  }
  const link = document.createElement("a");
  link.href = resultUrl;
  link.download = `t2v-${job.id}.${job.format}`;
  link.textContent = `Download ${job.format.toUpperCase()}`;
  $("result").replaceChildren(media, link);
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  $("result").replaceChildren();
  try {
    const response = await api("/v1/videos", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(readOptions()),
    });
    current = await response.json();
    showStatus(current);
    refreshHistory();
    current = await follow(current);
    if (current.status === "completed") await showVideo(current);
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    $("generate").disabled = false;
    refreshHistory();
  }
}

async function cancel() {
  if (!current) return;
  try {
    showStatus(await (await api(`/v1/videos/${current.id}`, { method: "DELETE" })).json());
  } catch (error) {
    showError(error.message);
  }
}

function historyItem(job) {
  const item = document.createElement("li");
  const prompt = document.createElement("span");
  prompt.textContent = job.prompt;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = ` · ${job.status} · ${job.format} · ${job.size} · ${job.seconds} s`
    + ` · seed ${job.seed} · ${new Date(job.created_at * 1000).toLocaleString()}`;
  item.append(prompt, meta);
  if (job.status === "completed") {
    const show = document.createElement("button");
    show.type = "button";
    show.className = "secondary";
    show.textContent = "Show";
    show.addEventListener("click", () => {
      current = job;
      showStatus(job);
      showVideo(job).catch((error) => showError(error.message));
    });
    item.append(show);
  }
  return item;
}

async function loadHistory(append) {
  const query = new URLSearchParams({ limit: "20" });
  if (append && historyAfter) query.set("after", historyAfter);
  const page = await (await api(`/v1/videos?${query}`)).json();
  const items = page.data.map(historyItem);
  if (append) $("history").append(...items); else $("history").replaceChildren(...items);
  historyAfter = page.has_more ? page.last_id : null;
  $("more").hidden = !historyAfter;
  $("history-empty").hidden = $("history").children.length > 0;
}

function refreshHistory() {
  loadHistory(false).catch(() => {});  // 401 already asked for a key
}

function saveKey(event) {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  loadModel().catch(() => {});
  refreshHistory();
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("key-form").addEventListener("submit", saveKey);
  $("cancel").addEventListener("click", cancel);
  $("more").addEventListener("click", () => loadHistory(true).catch(() => {}));
  loadModel().catch((error) => {
    if ($("key-form").hidden) showError(error.message);  // a 401 already asked for a key
  });
  refreshHistory();
});
