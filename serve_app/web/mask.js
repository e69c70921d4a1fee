// Transform's upload and mask brush in one: the uploaded image is shown once, with a canvas over it on
// which the user paints what the edit should repaint. The painting is kept at the upload's own pixel
// size and sent as OpenAI's `mask` (a PNG, fully transparent where painted, opaque elsewhere). Loaded
// after app.js; app.js asks `window.zimageMask.blob()` for the file, control.js `painted()` (and listens
// for "zimage:mask" on document, sent whenever the painting changes).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const box = $("t-mask"), stage = $("t-stage"), canvas = $("t-mask-canvas"), preview = $("t-preview");
  const size = $("t-mask-size"), erase = $("t-mask-erase");
  const paint = canvas.getContext("2d", { willReadFrequently: true });
  const PAINT = "rgb(255, 64, 96)";
  let last = null, painted = false;

  // A new upload: the canvas takes its pixel size, and the painting starts empty.
  preview.addEventListener("load", () => {
    canvas.width = preview.naturalWidth;
    canvas.height = preview.naturalHeight;
    stage.hidden = box.hidden = false;
    $("t-drop-hint").hidden = true;
    clear();
  });
  $("t-file").addEventListener("change", () => {
    if ($("t-file").files[0]) return;
    stage.hidden = box.hidden = true;
    $("t-drop-hint").hidden = false;
    changed();
  });

  function clear() {
    paint.clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
    status();
  }

  // Painted becomes unpainted and back, pixel by pixel.
  function invert() {
    const data = paint.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const on = px[i + 3] >= 128;
      px[i] = 255; px[i + 1] = 64; px[i + 2] = 96; px[i + 3] = on ? 0 : 255;
    }
    paint.putImageData(data, 0, 0);
    markPainted();
    status();
  }

  // The brush size is in screen pixels; the canvas may be shown smaller or larger than its pixels.
  function toCanvas(event) {
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  function stroke(from, to) {
    paint.globalCompositeOperation = erase.checked ? "destination-out" : "source-over";
    paint.strokeStyle = paint.fillStyle = PAINT;
    paint.lineCap = paint.lineJoin = "round";
    paint.lineWidth = Number(size.value) * to.scale;
    paint.beginPath();
    paint.moveTo(from.x, from.y);
    paint.lineTo(to.x, to.y);
    paint.stroke();
    paint.globalCompositeOperation = "source-over";
    if (!erase.checked) markPainted();
  }

  // The first paint of an upload sets strength to 1: a painted area is repainted from noise, as
  // diffusers' inpainting default (the user may lower it afterwards).
  function markPainted() {
    if (painted) return;
    painted = true;
    const strength = $("t-strength");
    strength.value = "1";
    strength.dispatchEvent(new Event("input"));
  }

  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = toCanvas(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = toCanvas(event);
    stroke(last, point);
    last = point;
  });
  for (const name of ["pointerup", "pointercancel"]) {
    canvas.addEventListener(name, () => { if (last) { last = null; status(); } });
  }
  size.addEventListener("input", () => { $("t-mask-size-value").value = size.value; });
  $("t-mask-clear").addEventListener("click", clear);
  $("t-mask-invert").addEventListener("click", invert);

  function coverage() {
    if (!canvas.width) return 0;
    const px = paint.getImageData(0, 0, canvas.width, canvas.height).data;
    let on = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] >= 128) on++;
    return on / (px.length / 4);
  }

  function status() {
    const share = coverage();
    $("t-mask-status").textContent = share > 0
      ? "Repaints " + (share * 100).toFixed(share < 0.01 ? 1 : 0) + "% of the image; the rest is kept."
      : "Nothing painted: the whole image is transformed.";
    changed();
  }

  function changed() {
    document.dispatchEvent(new CustomEvent("zimage:mask"));
  }

  // Whether an upload is shown with something painted on it.
  function hasPainting() {
    return !box.hidden && coverage() > 0;
  }

  // The mask file for the edit, or null when nothing is painted (a plain transform).
  async function blob() {
    if (box.hidden || coverage() === 0) return null;
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const ctx = out.getContext("2d");
    const mask = ctx.createImageData(out.width, out.height);
    const src = paint.getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < src.length; i += 4) mask.data[i + 3] = src[i + 3] >= 128 ? 0 : 255;  // black, opaque
    ctx.putImageData(mask, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  window.zimageMask = { blob, painted: hasPainting };
})();
