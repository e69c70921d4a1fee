// The page for the images API: Generate and Transform, fed by streamed responses (server-sent events
// over fetch: `stream: true`, `partial_images`). No framework, nothing from the network but this server.
// Every URL is relative (no leading "/"): it resolves against the page's <base href>, which the server
// sets to where it serves the app, so the page works under a route prefix too.
"use strict";

const PARTIAL_IMAGES = 2;
const HISTORY_SIZE = 12;
const EXAMPLES = [
  { label: "Lighthouse at dusk", prompt: "an old lighthouse on a rocky coast at dusk, waves breaking, warm light in the lantern", style: "Cinematic", size: "1344x768" },
  { label: "Fox in snow", prompt: "a red fox standing in fresh snow, soft morning light, detailed fur", style: "Photorealistic", size: "1024x1024" },
  { label: "Koi pond", prompt: "a koi pond in autumn, maple leaves floating on the water, seen from above", style: "Watercolor", size: "1152x896" },
  { label: "Tea house poster", prompt: "a poster for a tea house with the words \"OPEN LATE\", lanterns, rainy street", style: "Digital Art", size: "832x1216" },
];

const $ = (id) => document.getElementById(id);
const emptyNote = $("empty");
const state = { key: sessionStorage.getItem("zimage-key") || "", settings: null, history: [] };

// ---- API ------------------------------------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || "The server answered " + status + ".");
    this.status = status;
    this.code = error.code;
  }
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers() });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// Reads a text/event-stream body and calls onEvent(type, data) for each event, until the body ends or
// onEvent returns true (the last event wanted): the rest of the body is then read in the background,
// so the server sees the stream to its end, and the caller goes on at once.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length && onEvent(type, JSON.parse(data.join("\n")))) {
        drain(reader);
        return;
      }
    }
  }
}

async function drain(reader) {
  try {
    while (!(await reader.read()).done);
  } catch (_) { /* the image is in hand: a late network error changes nothing */ }
}

async function streamImage(path, init, card) {
  const response = await fetch(path, init);
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  let completed = null;
  await readEvents(response, (type, data) => {
    if (type === "error" || data.type === "error") throw new ApiError(500, data);
    if (data.type === "zimage.progress") card.progress(data.step, data.steps);
    else if (data.type.endsWith(".partial_image")) card.partial(data);
    else if (data.type.endsWith(".completed")) completed = data;
    return completed !== null;  // the image is here: the request is over for the page
  });
  if (!completed) throw new Error("The stream ended before the image was complete.");
  return completed;
}

// ---- messages -------------------------------------------------------------------------------------

function showError(error) {
  const box = $("error");
  let text = error.message || String(error);
  if (error.status === 401) {
    text += " Enter an API key above.";
    $("key-box").open = true;
  }
  box.textContent = text;
  box.hidden = false;
  box.scrollIntoView({ block: "nearest", behavior: "smooth" });  // on a phone the form is far below it
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- result cards ---------------------------------------------------------------------------------

function mimeOf(format) {
  return "image/" + (format === "jpeg" ? "jpeg" : format);
}

function makeCard(label) {
  const card = document.createElement("article");
  card.className = "card";
  card.innerHTML =
    '<div class="frame"><img alt=""><div class="placeholder">Waiting…</div></div>' +
    '<div class="status"><progress max="1" value="0"></progress><span class="steps" aria-live="off"></span></div>' +
    '<dl class="meta" hidden></dl><div class="actions" hidden></div>';
  emptyNote.hidden = true;
  $("cards").appendChild(card);
  const img = card.querySelector("img");
  const bar = card.querySelector("progress");
  const steps = card.querySelector(".steps");
  steps.textContent = label;
  return {
    element: card,
    progress(step, total) {
      bar.max = total;
      bar.value = step;
      steps.textContent = "Step " + step + " of " + total;
    },
    partial(event) {
      img.src = "data:" + mimeOf(event.output_format) + ";base64," + event.b64_json;
      img.alt = "Partial image " + (event.partial_image_index + 1);
      card.classList.add("forming");
      card.querySelector(".placeholder").hidden = true;
    },
    done(event, settings) {
      const src = "data:" + mimeOf(event.output_format) + ";base64," + event.b64_json;
      showFinal(card, src, event, settings);
      addHistory(src, event, settings);
      if (card === $("cards").querySelector(".card")) card.scrollIntoView({ block: "nearest", behavior: "smooth" });
    },
    fail(error) {
      card.classList.add("failed");
      steps.textContent = "Failed: " + (error.message || error);
    },
  };
}

function clearCards() {
  $("cards").replaceChildren(emptyNote);
}

function showFinal(card, src, event, settings) {
  const img = card.querySelector("img");
  img.src = src;
  img.alt = "Image for seed " + event.seed;
  card.classList.remove("forming");
  card.querySelector(".placeholder").hidden = true;
  card.querySelector(".status").hidden = true;
  const meta = card.querySelector(".meta");
  const rows = [["Seed", event.seed], ["Size", event.size], ["Steps", settings.steps], ["Style", settings.style || "None"]];
  if (settings.strength) rows.push(["Strength", settings.strength]);
  if (event.loras) rows.push(["LoRA", event.loras.map((l) => l.name + " × " + l.scale).join(", ")]);  // name × scale
  rows.push(["Time", (event.timings.total_ms / 1000).toFixed(1) + " s"]);
  meta.innerHTML = "";
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (name === "Seed") dd.className = "seed";
    meta.append(dt, dd);
  }
  meta.hidden = false;
  const actions = card.querySelector(".actions");
  actions.innerHTML = "";
  const download = document.createElement("a");
  download.href = src;
  download.download = "z-image-" + event.seed + "." + event.output_format;
  download.textContent = "Download";
  download.className = "button";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.textContent = "Copy seed";
  copy.addEventListener("click", () => copySeed(String(event.seed), copy));
  actions.append(download, copy);
  actions.hidden = false;
}

async function copySeed(seed, button) {
  try {
    await navigator.clipboard.writeText(seed);
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Seed: " + seed;
  }
  setTimeout(() => { button.textContent = "Copy seed"; }, 2000);
}

function addHistory(src, event, settings) {
  state.history.unshift({ src, event, settings });
  state.history.length = Math.min(state.history.length, HISTORY_SIZE);
  const list = $("history");
  list.innerHTML = "";
  for (const item of state.history) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.title = "Seed " + item.event.seed + ": " + item.settings.prompt;
    button.setAttribute("aria-label", "Show the image of seed " + item.event.seed);
    const img = document.createElement("img");
    img.src = item.src;
    img.alt = "";
    button.appendChild(img);
    button.addEventListener("click", () => {
      clearCards();
      const card = makeCard("");
      showFinal(card.element, item.src, item.event, item.settings);
    });
    li.appendChild(button);
    list.appendChild(li);
  }
}

// ---- forms ----------------------------------------------------------------------------------------

function addCommonControls(form, prefix) {
  const copy = $("common-controls").content.cloneNode(true);
  for (const el of copy.querySelectorAll("[data-id]")) el.id = prefix + "-" + el.dataset.id;
  for (const el of copy.querySelectorAll("[data-for]")) el.htmlFor = prefix + "-" + el.dataset.for;
  for (const el of copy.querySelectorAll("[data-out]")) { el.id = prefix + "-" + el.dataset.out + "-value"; el.htmlFor = prefix + "-steps"; }
  form.querySelector(".common").appendChild(copy);
  const steps = $(prefix + "-steps");
  const seed = $(prefix + "-seed");
  const random = $(prefix + "-random");
  steps.addEventListener("input", () => { $(prefix + "-steps-value").value = steps.value; });
  random.addEventListener("change", () => { if (!random.checked && seed.value === "") seed.value = randomSeed(); });
  seed.addEventListener("input", () => { random.checked = seed.value === ""; });
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

function chosenSeed(prefix) {
  const seed = $(prefix + "-seed");
  if ($(prefix + "-random").checked || seed.value === "") return randomSeed();
  return Number(seed.value);
}

function applySettings(settings) {
  const aspect = $("g-aspect");
  aspect.innerHTML = "";
  for (const [w, h] of settings.size_presets) {
    const option = new Option(w + " × " + h + "  (" + ratio(w, h) + ")", w + "x" + h);
    aspect.add(option);
  }
  aspect.add(new Option("Custom…", "custom"));
  for (const id of ["g-width", "g-height"]) {
    Object.assign($(id), { min: settings.min_side, max: settings.max_side, step: settings.side_multiple });
  }
  for (const prefix of ["g", "t"]) {
    const steps = $(prefix + "-steps");
    steps.max = settings.max_steps;
    steps.min = Math.min(4, settings.max_steps);
    steps.value = settings.default_steps;
    $(prefix + "-steps-value").value = settings.default_steps;
  }
  for (const id of ["g-n", "t-n"]) $(id).max = settings.max_images;
  if (window.zimageControl) window.zimageControl.apply(settings);  // the Control section (control.js)
  if (window.zimageLora) window.zimageLora.apply(settings);  // the LoRA picker (lora.js)
  if (settings.api_keys_required && !state.key) $("key-box").open = true;
}

// With a ControlNet whose channels the server does not know yet (its Denoiser still starting), the
// settings are asked again until it does: Transform's Control section depends on them.
async function awaitControlChannels(settings) {
  for (let wait = 1000; settings.controlnet && settings.control_channels === null; wait = Math.min(2 * wait, 30000)) {
    await new Promise((resolve) => setTimeout(resolve, wait));
    try { settings = await getJson("page/settings"); } catch (_) { continue; }
  }
  if (settings !== state.settings) {
    state.settings = settings;
    if (window.zimageControl) window.zimageControl.apply(settings);
  }
}

function ratio(w, h) {
  const gcd = (a, b) => (b ? gcd(b, a % b) : a);
  const d = gcd(w, h);
  const [a, b] = [w / d, h / d];
  return a <= 32 && b <= 32 ? a + ":" + b : (w / h).toFixed(2) + ":1";
}

async function loadStyles() {
  const body = await getJson("v1/styles");
  for (const select of document.querySelectorAll(".style-select")) {
    const current = select.value;
    select.innerHTML = "";
    for (const style of body.data) select.add(new Option(style.name, style.name));
    select.value = current && body.data.some((s) => s.name === current) ? current : body.default;
  }
}

async function loadModel() {
  const body = await getJson("v1/models");
  $("random-banner").hidden = !body.data.some((m) => m.random_weights);
}

async function refreshFromServer() {
  try {
    await Promise.all([loadStyles(), loadModel(), window.zimageLora ? window.zimageLora.refresh() : null]);
  } catch (error) {
    showError(error);
  }
}

function generateSize() {
  const aspect = $("g-aspect").value;
  return aspect === "custom" ? $("g-width").value + "x" + $("g-height").value : aspect;
}

// A tab's submit handler, wrapped: its button says the run is on from the tap until the run ends, and
// comes back as it was however it ends (images, an API error, a dropped connection, a page error).
function submitting(handler) {
  return async (event) => {
    event.preventDefault();
    const button = event.target.querySelector("button[type=submit]");
    if (button.disabled) return;
    const label = button.textContent;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = label + "…";
    try {
      await handler(event);
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
      button.textContent = label;
    }
  };
}

// One streamed request per image, each with its card; the first failure is shown once all have ended.
async function runAll(makeRequest, count) {
  clearError();
  clearCards();
  const jobs = [];
  for (let i = 0; i < count; i++) {
    const card = makeCard(count > 1 ? "Image " + (i + 1) + ": waiting…" : "Waiting…");
    const { path, init, settings } = makeRequest(i);
    jobs.push(streamImage(path, init, card).then((event) => card.done(event, settings), (error) => {
      card.fail(error);
      throw error;
    }));
  }
  const outcomes = await Promise.allSettled(jobs);
  const failed = outcomes.find((o) => o.status === "rejected");
  if (failed) showError(failed.reason);
}

async function onGenerate(event) {
  event.preventDefault();
  await refreshStylesQuietly();
  const seed = chosenSeed("g");
  const n = imageCount("g");
  const settings = { prompt: $("g-prompt").value, style: $("g-style").value, steps: Number($("g-steps").value) };
  const control = window.zimageControl ? await window.zimageControl.fields("g") : null;  // control.js
  const loras = window.zimageLora ? window.zimageLora.chosen("g") : null;  // lora.js
  // One streamed request per image (a stream carries one image); image i uses seed + i, as n does.
  await runAll((i) => ({
    path: "v1/images/generations",
    settings,
    init: {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        prompt: settings.prompt, size: generateSize(), style: settings.style, seed: seed + i,
        num_inference_steps: settings.steps, stream: true, partial_images: PARTIAL_IMAGES, stream_progress: true,
        ...control, ...(loras && { loras }),
      }),
    },
  }), n);
}

// "Number of images" of a tab, within 1 and the server's max_images.
function imageCount(prefix) {
  return Math.min(Math.max(1, Number($(prefix + "-n").value) || 1), state.settings ? state.settings.max_images : 1);
}

async function onTransform(event) {
  event.preventDefault();
  const file = $("t-file").files[0];
  if (!file) {
    showError(new Error("Choose an image to transform first."));
    return;
  }
  await refreshStylesQuietly();
  const seed = chosenSeed("t");
  const settings = {
    prompt: $("t-prompt").value, style: $("t-style").value, steps: Number($("t-steps").value),
    strength: Number($("t-strength").value),
  };
  const mask = window.zimageMask ? await window.zimageMask.blob() : null;  // the brush's (mask.js)
  const control = window.zimageControl ? await window.zimageControl.fields("t", true) : null;  // control.js
  if (control) delete settings.strength;  // the ControlNet repaints the mask from noise: none is sent or shown
  const loras = window.zimageLora ? window.zimageLora.chosen("t") : null;  // lora.js
  // As on Generate: one streamed edit per image, image i with seed + i, as the API's n gives them.
  await runAll((i) => {
    const body = new FormData();
    body.append("image", file);
    if (mask) body.append("mask", mask, "mask.png");
    body.append("prompt", settings.prompt);
    body.append("style", settings.style);
    if (control) {  // the ControlNet repaints the mask from noise: no strength
      for (const [key, value] of Object.entries(control)) body.append(key, value instanceof Blob ? value : String(value));
    } else {
      body.append("strength", String(settings.strength));
    }
    if (loras) body.append("loras", JSON.stringify(loras));  // the edit route's multipart `loras` field
    body.append("num_inference_steps", String(settings.steps));
    body.append("seed", String(seed + i));
    body.append("stream", "true");
    body.append("stream_progress", "true");
    body.append("partial_images", String(PARTIAL_IMAGES));
    return { path: "v1/images/edits", settings, init: { method: "POST", headers: headers(), body } };
  }, imageCount("t"));
}

// Styles are live config on the server: fetch them again before each run, keeping the choice.
async function refreshStylesQuietly() {
  try { await loadStyles(); } catch (_) { /* the request itself reports the problem */ }
}

function setUpUpload() {
  const input = $("t-file");
  const drop = $("drop");
  const show = () => {  // the image appears with its mask canvas once loaded (mask.js)
    const file = input.files[0];
    if (file) $("t-preview").src = URL.createObjectURL(file);
  };
  input.addEventListener("change", show);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      show();
    }
  });
  $("t-strength").addEventListener("input", () => { $("t-strength-value").value = $("t-strength").value; });
}

function setUpTabs() {
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  const select = (tab) => {
    for (const t of tabs) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !selected;
    }
    tab.focus();
  };
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (e) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      select(tabs[(next + tabs.length) % tabs.length]);
    });
  }
}

function setUpExamples() {
  const box = $("examples");
  for (const example of EXAMPLES) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip";
    button.textContent = example.label;
    button.addEventListener("click", () => {
      $("g-prompt").value = example.prompt;
      if (Array.from($("g-style").options).some((o) => o.value === example.style)) $("g-style").value = example.style;
      $("g-aspect").value = example.size;
      $("g-aspect").dispatchEvent(new Event("change"));
      $("g-prompt").focus();
    });
    box.appendChild(button);
  }
}

async function main() {
  addCommonControls($("panel-generate"), "g");
  addCommonControls($("panel-transform"), "t");
  setUpTabs();
  setUpUpload();
  setUpExamples();
  $("g-aspect").addEventListener("change", () => { $("g-custom").hidden = $("g-aspect").value !== "custom"; });
  $("panel-generate").addEventListener("submit", submitting(onGenerate));
  $("panel-transform").addEventListener("submit", submitting(onTransform));
  $("api-key").value = state.key;
  $("key-save").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("zimage-key", state.key);
    clearError();
    refreshFromServer();
  });
  try {
    state.settings = await getJson("page/settings");
    applySettings(state.settings);
    awaitControlChannels(state.settings);
  } catch (error) {
    showError(error);
  }
  await refreshFromServer();
  document.body.dataset.ready = "true";
}

main();
