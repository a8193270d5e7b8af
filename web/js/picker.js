// PhysMaster preference picker: shows the N candidate videos inside the PhysMasterPreferencePicker node while it
// waits, and posts the person's choice. Registered through the frontend's extension API only: no DOM-id lookups,
// no patching of frontend internals. Node lookup goes through the graph API, so it works inside subgraphs.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "PhysMasterPreferencePicker";
const WIDGET = "physmaster_picker";

// "12" or "5:12" (a node inside subgraph node 5) -> the LGraphNode, using only public graph methods.
function nodeByExecutionId(executionId) {
  const parts = String(executionId).split(":");
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (let i = 0; i < parts.length; i++) {
    node = graph?.getNodeById?.(Number(parts[i])) ?? graph?.getNodeById?.(parts[i]);
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

function viewUrl(file) {
  const q = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder ?? "", type: file.type });
  return api.apiURL(`/view?${q}`);
}

function ensureWidget(node) {
  let state = node.__physmasterPicker;
  if (state) return state;
  const root = document.createElement("div");
  root.className = "physmaster-picker";
  root.tabIndex = 0;
  root.style.cssText = "display:flex;flex-direction:column;gap:6px;padding:4px;outline:none;overflow:auto;";
  const status = document.createElement("div");
  status.className = "physmaster-picker-status";
  status.style.cssText = "font-size:12px;color:var(--input-text, #ddd);min-height:1.2em;";
  const grid = document.createElement("div");
  grid.className = "physmaster-picker-grid";
  grid.style.cssText = "display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:6px;";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:6px;";
  const skip = document.createElement("button");
  skip.textContent = "Skip";
  skip.className = "physmaster-picker-skip";
  bar.append(skip);
  root.append(status, grid, bar);
  const widget = node.addDOMWidget(WIDGET, "physmaster-picker", root, { serialize: false, hideOnZoom: false });
  widget.computeSize = (width) => [width, Math.max(160, root.scrollHeight + 8)];
  state = { root, status, grid, skip, request: null, best: null, worst: null };
  node.__physmasterPicker = state;

  skip.addEventListener("click", () => submit(state, { skip: true }));
  root.addEventListener("keydown", (e) => {
    if (!state.request) return;
    const k = Number.parseInt(e.key, 10);
    const n = state.request.candidates.length;
    // Digit keys 1..N: the shifted digit row yields symbols, so use e.code for Shift (= mark worst).
    const code = /^Digit(\d)$/.exec(e.code ?? "");
    const index = (code ? Number(code[1]) : k) - 1;
    if (Number.isInteger(index) && index >= 0 && index < n) {
      e.preventDefault();
      e.stopPropagation();
      mark(state, index, e.shiftKey ? "worst" : "best");
    } else if (e.key === "Escape") {
      submit(state, { skip: true });
    }
  });
  return state;
}

function render(state) {
  const req = state.request;
  state.grid.replaceChildren();
  if (!req) return;
  req.candidates.forEach((file, i) => {
    const card = document.createElement("div");
    card.className = "physmaster-picker-candidate";
    card.dataset.index = String(i);
    const role = state.best === i ? "best" : state.worst === i ? "worst" : "";
    card.dataset.role = role;
    card.style.cssText = `border:3px solid ${role === "best" ? "#3c3" : role === "worst" ? "#d33" : "transparent"};` +
      "border-radius:4px;cursor:pointer;text-align:center;font-size:11px;";
    const img = document.createElement("img");
    img.src = viewUrl(file);
    img.style.cssText = "width:100%;image-rendering:pixelated;display:block;";
    img.draggable = false;
    const label = document.createElement("div");
    label.style.color = "var(--input-text, #ddd)";
    label.textContent = `${i + 1}${role ? ` - ${role}` : ""}`;
    const buttons = document.createElement("div");
    buttons.style.cssText = "display:flex;gap:2px;justify-content:center;";
    for (const which of ["best", "worst"]) {
      const b = document.createElement("button");
      b.textContent = which;
      b.className = `physmaster-picker-${which}`;
      b.addEventListener("click", (e) => { e.stopPropagation(); mark(state, i, which); });
      buttons.append(b);
    }
    card.addEventListener("click", () => mark(state, i, state.best === null ? "best" : "worst"));
    card.append(img, label, buttons);
    state.grid.append(card);
  });
}

function mark(state, index, which) {
  if (!state.request) return;
  if (which === "best") {
    state.best = index;
    if (state.worst === index) state.worst = null;
  } else {
    state.worst = index;
    if (state.best === index) state.best = null;
  }
  render(state);
  if (state.best !== null && state.worst !== null) submit(state, { best: state.best, worst: state.worst });
  else state.status.textContent = `Mark the ${state.best === null ? "best" : "worst"} video (keys 1-${state.request.candidates.length}, Shift for worst).`;
}

async function submit(state, choice) {
  const req = state.request;
  if (!req) return;
  state.status.textContent = "Sending...";
  try {
    const res = await api.fetchApi("/physmaster/pick", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: req.request_id, choice }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      state.status.textContent = `Not accepted: ${body.error ?? res.status}`;
      return;
    }
    // the node says what became of the answer (saved, or not saved and why) in physmaster.pick_done, which
    // may arrive before this response: then the request is already closed and its message stays
    if (state.request === req) {
      state.status.textContent = choice.skip ? "Skipped." : "Sent. Saving...";
      state.request = null;
    }
  } catch (err) {
    state.status.textContent = `Could not send the choice: ${err}`;
  }
}

app.registerExtension({
  name: "physmaster.preferencePicker",
  setup() {
    api.addEventListener("physmaster.pick", ({ detail }) => {
      const node = nodeByExecutionId(detail.node_id);
      if (!node || node.type !== NODE_TYPE && node.comfyClass !== NODE_TYPE) return;
      const state = ensureWidget(node);
      state.request = detail;
      state.best = null;
      state.worst = null;
      const secs = Math.round(detail.timeout ?? 0);
      state.status.textContent = `Mark the best and the worst of ${detail.candidates.length} videos ` +
        `(click, or keys 1-${detail.candidates.length}; Shift+key = worst). Waiting up to ${secs}s, then: ${detail.on_timeout}.`;
      render(state);
      state.root.focus({ preventScroll: true });
      node.setDirtyCanvas?.(true, true);
    });
    api.addEventListener("physmaster.pick_done", ({ detail }) => {
      const node = nodeByExecutionId(detail.node_id);
      const state = node?.__physmasterPicker;
      if (!state || (state.request && state.request.request_id !== detail.request_id)) return;
      state.request = null;
      state.status.textContent = detail.message ?? "Done.";
      render(state);
    });
  },
});
