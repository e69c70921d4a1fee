// The LoRA picker of Generate and Transform: the adapters GET /v1/loras lists (the section is hidden when
// there are none), at most the server's per-request cap of them chosen, each with its scale (-2..2).
// Loaded after app.js; app.js calls `window.zimageLora.apply(settings)` once the page settings are known,
// `refresh()` when the key changes, and asks `chosen(prefix)` for a request's `loras`.
"use strict";

(() => {
  const byId = (id) => document.getElementById(id);
  const PREFIXES = ["g", "t"];
  const picker = { max: 0, adapters: [] };

  function build(prefix) {
    const copy = byId("lora-controls").content.cloneNode(true);
    copy.querySelector("[data-box]").id = prefix + "-loras";
    for (const el of copy.querySelectorAll("[data-id]")) el.id = prefix + "-loras-" + el.dataset.id;
    byId("panel-" + (prefix === "g" ? "generate" : "transform")).querySelector(".lora-slot").appendChild(copy);
    const box = byId(prefix + "-loras");
    box.addEventListener("toggle", () => { if (box.open) refresh().catch(() => {}); });  // files added while serving
  }

  // One row: a checkbox with the adapter's name and rank, and its scale slider once chosen.
  function row(prefix, adapter, before) {
    const id = prefix + "-lora-" + adapter.name;
    const item = byId("lora-row").content.firstElementChild.cloneNode(true);
    const use = item.querySelector("[data-part=use]");
    const scale = item.querySelector("[data-part=scale]");
    const value = item.querySelector("[data-part=scale-value]");
    use.id = id;
    use.value = adapter.name;
    item.querySelector("[data-part=name]").textContent = adapter.name + (adapter.rank ? " (rank " + adapter.rank + ")" : "");
    scale.id = id + "-scale";
    value.id = id + "-scale-value";
    item.querySelector("[data-part=scale-label]").htmlFor = scale.id;
    use.checked = Boolean(before);
    scale.value = before ? before.scale : 1;
    value.value = scale.value;
    item.querySelector(".lora-scale").hidden = !use.checked;
    use.addEventListener("change", () => {
      item.querySelector(".lora-scale").hidden = !use.checked;
      enforceCap(prefix);
    });
    scale.addEventListener("input", () => { value.value = scale.value; });
    return item;
  }

  // Once the cap is reached, the adapters not chosen cannot be ticked.
  function enforceCap(prefix) {
    const boxes = Array.from(byId(prefix + "-loras-list").querySelectorAll("[data-part=use]"));
    const count = boxes.filter((b) => b.checked).length;
    for (const b of boxes) b.disabled = !b.checked && count >= picker.max;
    byId(prefix + "-loras-count").textContent = count ? "(" + count + " chosen)" : "";
    byId(prefix + "-loras-status").textContent =
      "Up to " + picker.max + " per image, each with its scale (-2 to 2; 1 applies it as trained).";
  }

  function render() {
    for (const prefix of PREFIXES) {
      if (!byId(prefix + "-loras")) build(prefix);
      const before = {};
      for (const lora of picked(byId(prefix + "-loras"))) before[lora.name] = lora;
      const list = byId(prefix + "-loras-list");
      list.replaceChildren(...picker.adapters.map((adapter) => row(prefix, adapter, before[adapter.name])));
      byId(prefix + "-loras").hidden = picker.adapters.length === 0 || picker.max === 0;
      enforceCap(prefix);
    }
  }

  // The adapters the server offers now (a file that cannot be used is listed with an error: left out).
  async function refresh() {
    const body = await getJson("v1/loras");  // app.js: with the key, errors as ApiError
    const adapters = body.data.filter((adapter) => !adapter.error);
    if (JSON.stringify(adapters) === JSON.stringify(picker.adapters) && byId("g-loras")) return;  // as shown
    picker.adapters = adapters;
    render();
  }

  // The cap comes with the page settings; the list itself from `refresh` (app.js's refreshFromServer).
  function apply(settings) {
    picker.max = settings.max_loras || 0;
    render();
  }

  function picked(box) {
    return Array.from(box.querySelectorAll("[data-part=use]:checked"))
      .map((use) => ({ name: use.value, scale: Number(byId(use.id + "-scale").value) }));
  }

  // The request's `loras` ([{name, scale}]), or null when none is chosen or the section is hidden.
  function chosen(prefix) {
    const box = byId(prefix + "-loras");
    if (!box || box.hidden) return null;
    const loras = picked(box);
    return loras.length ? loras : null;
  }

  window.zimageLora = { apply, refresh, chosen };
  if (typeof state !== "undefined" && state.settings) {  // app.js got them first
    apply(state.settings);
    refresh().catch(showError);
  }
})();
