// The Control section of Generate and Transform: a control image, its scale, and server-side canny
// edges with their preview (the server's own edge map, from /page/control-preview). Generate shows it
// when the server has a ControlNet. An edit with a control image is inpainting (the ControlNet repaints
// the masked area), so Transform shows it only when the ControlNet takes a mask (the page settings'
// `controlnet_inpaints`) and takes a control image only once a mask is painted: the page never sends
// a form the server must refuse. Loaded after app.js; app.js calls `window.zimageControl.apply(settings)`
// once the page settings are known and asks `window.zimageControl.fields(prefix)` for a request's fields.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const PREFIXES = ["g", "t"];

  function build(prefix) {
    const copy = byId("control-controls").content.cloneNode(true);
    copy.querySelector("[data-box]").id = prefix + "-control";
    for (const el of copy.querySelectorAll("[data-id]")) el.id = prefix + "-control-" + el.dataset.id;
    for (const el of copy.querySelectorAll("[data-for]")) el.htmlFor = prefix + "-control-" + el.dataset.for;
    byId("panel-" + (prefix === "g" ? "generate" : "transform")).querySelector(".control-slot").appendChild(copy);
    const part = (name) => byId(prefix + "-control-" + name);
    part("scale").addEventListener("input", () => { part("scale-value").value = part("scale").value; });
    part("file").addEventListener("change", () => show(prefix));
    part("canny").addEventListener("change", () => show(prefix));
    part("clear").addEventListener("click", () => { part("file").value = ""; show(prefix); });
  }

  async function base64Of(file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }

  // The preview: the file itself, or with canny on, the server's edge map of it.
  async function show(prefix) {
    const part = (name) => byId(prefix + "-control-" + name);
    const file = part("file").files[0];
    const preview = part("preview");
    const status = part("status");
    if (!file) {
      preview.hidden = true;
      preview.removeAttribute("src");
      status.textContent = "No control image: the image is not guided.";
      return;
    }
    status.textContent = "";
    if (!part("canny").checked) {
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      return;
    }
    status.textContent = "Finding edges…";
    try {
      const response = await fetch("page/control-preview", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify({ control_image: await base64Of(file) }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new Error((body && body.error && body.error.message) || "The preview failed (" + response.status + ").");
      }
      preview.src = URL.createObjectURL(await response.blob());
      preview.hidden = false;
      status.textContent = "The edges the server will use.";
    } catch (error) {
      preview.hidden = true;
      status.textContent = error.message;
    }
  }

  function apply(settings) {
    for (const prefix of PREFIXES) {
      if (!byId(prefix + "-control")) build(prefix);
      byId(prefix + "-control").hidden = prefix === "g" ? !settings.controlnet : settings.controlnet_inpaints !== true;
      show(prefix);
    }
    needsMask();
  }

  // Transform: the control image waits for a mask (what the ControlNet repaints).
  function needsMask() {
    const file = byId("t-control-file");
    if (!file) return;
    const masked = Boolean(window.zimageMask && window.zimageMask.painted());
    file.disabled = !masked;
    const note = byId("t-control-needs");
    note.hidden = masked;
    note.textContent = "First paint on the image the area to repaint: with a control image, the ControlNet " +
      "repaints that area from noise (strength does not apply), guided by the control image.";
  }
  document.addEventListener("zimage:mask", needsMask);

  // The request's control fields, or null when no control image is chosen (or the section is hidden):
  // the image as base64 for a JSON body, or with `asFile` the file itself for a multipart one.
  async function fields(prefix, asFile = false) {
    const box = byId(prefix + "-control");
    const usable = box && !box.hidden && !byId(prefix + "-control-file").disabled;
    const file = usable ? byId(prefix + "-control-file").files[0] : null;
    if (!file) return null;
    const image = asFile ? file : await base64Of(file);
    const out = { control_image: image, control_scale: Number(byId(prefix + "-control-scale").value) };
    if (byId(prefix + "-control-canny").checked) out.control_preprocess = "canny";
    return out;
  }

  window.zimageControl = { apply, fields };
  if (typeof state !== "undefined" && state.settings) apply(state.settings);  // app.js got them first
})();
