// PhysMaster preference picker: shows the N candidate videos inside the PhysMasterPreferencePicker node while it
// waits, playing on one clock (pause, step, ¼/½/1× speed, enlarge one or two side by side, the judge's trajectory
// overlay), and posts the person's answer: best/worst (the quick path) or a ranking of all N with ties. "Undo"
// takes back the last mark, or the saved answer (the node drops it with a tombstone).
// Registered through the frontend's extension API only: no DOM-id lookups, no patching of frontend internals. Node
// lookup goes through the graph API, so it works inside subgraphs. Keys work without focusing the widget while a
// picker waits (a capture listener on window that only takes the keys it uses, and never while typing).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { el, fitNode, nodeByExecutionId, Player, SheetView } from "./sheet_player.js";

const NODE_TYPE = "PhysMasterPreferencePicker";
const WIDGET = "physmaster_picker";
const HELP = "Keys: 1-9 next place (first = best) · Shift+1-9 worst · = tie with the last placed · Enter: the rest " +
  "tie below · U undo · Space pause · ←/→ step · S speed · T trajectories · Alt+1-9 or click: enlarge · Esc skip";

let active = null;  // the picker state that gets the keys: the one waiting (or the last that saved, for undo)

function ensureWidget(node) {
  let state = node.__physmasterPicker;
  if (state) return state;
  const root = el("div", { className: "physmaster-picker", tabIndex: 0,
    style: "display:flex;flex-direction:column;gap:4px;padding:4px;outline:none;overflow-x:hidden;overflow-y:auto;" +
      "font-size:12px;color:var(--input-text, #ddd);" });
  const status = el("div", { className: "physmaster-picker-status", style: "min-height:1.2em;" });
  const ranking = el("div", { className: "physmaster-picker-ranking", style: "min-height:1.2em;opacity:0.9;" });
  const controls = el("div", { className: "physmaster-picker-controls",
    style: "display:flex;flex-wrap:wrap;gap:4px;align-items:center;" });
  const focus = el("div", { className: "physmaster-picker-focus", style: "display:none;gap:4px;" });
  const grid = el("div", { className: "physmaster-picker-grid",
    style: "display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:6px;min-width:0;" });
  const help = el("div", { className: "physmaster-picker-help", style: "opacity:0.6;font-size:10px;", textContent: HELP });
  root.append(status, ranking, controls, focus, grid, help);
  const widget = node.addDOMWidget(WIDGET, "physmaster-picker", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => Math.max(160, state?.minHeight ?? 160) });
  state = { node, root, status, ranking, controls, focus, grid, widget, request: null, answered: null,
    undoable: null, tracks: null, overlay: false, focused: [], views: [], top: [], bottom: [], tieNext: false,
    history: [], minHeight: 160 };
  state.player = new Player(() => updateControls(state));
  node.__physmasterPicker = state;
  buildControls(state);
  root.addEventListener("pointerdown", () => { active = state; });
  return state;
}

function button(text, cls, onclick, title = "") {
  return el("button", { textContent: text, className: cls, title, style: "padding:0 4px;font-size:inherit;",
    onclick: (e) => { e.stopPropagation(); onclick(); } });
}

function buildControls(state) {
  const p = state.player;
  state.playButton = button("Pause", "physmaster-picker-play", () => p.toggle(), "Space");
  state.speedButton = button("1×", "physmaster-picker-speed", () => p.cycleSpeed(), "S: 1×, ½×, ¼×");
  state.overlayButton = button("Trajectory", "physmaster-picker-overlay", () => toggleOverlay(state),
    "T: the track the physics judge followed (red) and its ballistic fit (green)");
  state.frameLabel = el("span", { className: "physmaster-picker-frame", style: "min-width:8em;" });
  state.controls.append(
    button("◀", "physmaster-picker-prev", () => p.step(-1), "←: one frame back"), state.playButton,
    button("▶", "physmaster-picker-next", () => p.step(1), "→: one frame on"), state.speedButton, state.frameLabel,
    state.overlayButton,
    button("Rest tie below", "physmaster-picker-enter", () => finishRanking(state), "Enter"),
    button("Undo", "physmaster-picker-undo", () => undo(state), "U: the last mark, or the saved answer"),
    button("Skip", "physmaster-picker-skip", () => submit(state, { skip: true }), "Esc"));
}

function updateControls(state) {
  const p = state.player;
  if (!state.playButton) return;
  state.playButton.textContent = p.playing ? "Pause" : "Play";
  state.speedButton.textContent = p.speed === 1 ? "1×" : p.speed === 0.5 ? "½×" : "¼×";
  state.frameLabel.textContent = `frame ${p.frame + 1}/${p.frames}`;
  state.root.dataset.frame = String(p.frame);
  state.root.dataset.playing = String(p.playing);
  state.root.dataset.speed = String(p.speed);
}

// --- marks --------------------------------------------------------------------------------------------------------
const placed = (state) => [...state.top.flat(), ...state.bottom.flat()];
const snapshot = (state) => ({ top: state.top.map((t) => [...t]), bottom: state.bottom.map((t) => [...t]),
  tieNext: state.tieNext });

function remember(state) {
  state.history.push(snapshot(state));
}

function place(state, index, where) {
  const req = state.request;
  if (!req || index < 0 || index >= req.candidates.length) return;
  if (placed(state).includes(index)) {
    state.status.textContent = `Video ${index + 1} is already placed (U undoes the last mark).`;
    return;
  }
  remember(state);
  const tiers = where === "top" ? state.top : state.bottom;
  if (state.tieNext && tiers.length) tiers[tiers.length - 1].push(index);
  else tiers.push([index]);
  state.tieNext = false;
  afterMark(state);
}

function afterMark(state) {
  const n = state.request.candidates.length;
  const quick = state.top.length === 1 && state.top[0].length === 1 && state.bottom.length === 1 &&
    state.bottom[0].length === 1;
  render(state);
  if (quick) return submit(state, { best: state.top[0][0], worst: state.bottom[0][0] });
  if (placed(state).length === n) return submit(state, { ranking: rankingOf(state, []) });
  prompt(state);
}

// best first: the top tiers, the candidates not placed (tied), then the bottom tiers (worst last)
function rankingOf(state, rest) {
  const tiers = [...state.top, ...(rest.length ? [rest] : []), ...[...state.bottom].reverse()];
  return tiers.map((t) => (t.length === 1 ? t[0] : [...t]));
}

function finishRanking(state) {
  const req = state.request;
  if (!req) return;
  if (!placed(state).length) {
    state.status.textContent = "Place at least the best first (its number key), then Enter ties the rest below.";
    return;
  }
  const rest = req.candidates.map((_, i) => i).filter((i) => !placed(state).includes(i));
  remember(state);
  submit(state, { ranking: rankingOf(state, rest) });
}

function describeRanking(state) {
  const fmt = (tiers) => tiers.map((t) => t.map((i) => i + 1).join(" = ")).join(" > ");
  const parts = [];
  if (state.top.length) parts.push(fmt(state.top));
  if (state.request) {
    const rest = state.request.candidates.length - placed(state).length;
    if (rest && (state.top.length || state.bottom.length)) parts.push(`(${rest} not placed)`);
  }
  if (state.bottom.length) parts.push(fmt([...state.bottom].reverse()));
  return parts.length ? `Ranking: ${parts.join(" > ")}${state.tieNext ? " =" : ""}` : "";
}

function roleOf(state, i) {
  for (let k = 0; k < state.top.length; k++) {
    if (state.top[k].includes(i)) return { kind: k === 0 ? "best" : "rank", place: k + 1, tied: state.top[k].length > 1 };
  }
  for (let k = 0; k < state.bottom.length; k++) {
    if (state.bottom[k].includes(i)) return { kind: k === 0 ? "worst" : "low", place: k + 1, tied: state.bottom[k].length > 1 };
  }
  return null;
}

function prompt(state) {
  const n = state.request.candidates.length;
  if (!placed(state).length) {
    state.status.textContent = `Mark the best and the worst of ${n} videos (keys 1-${Math.min(n, 9)}, Shift = worst), ` +
      "or rank them: keys in order, = ties, Enter ties the rest below.";
  } else if (state.top.length === 1 && state.top[0].length === 1 && !state.bottom.length) {
    state.status.textContent = "Now the worst (Shift+key or its worst button), or the next place (key), or Enter.";
  } else {
    state.status.textContent = `${n - placed(state).length} left: next place (key), Shift+key from the bottom, Enter ends.`;
  }
}

async function undo(state) {
  if (state.request && state.history.length) {
    const prev = state.history.pop();
    state.top = prev.top;
    state.bottom = prev.bottom;
    state.tieNext = prev.tieNext;
    render(state);
    prompt(state);
    state.status.textContent = `Undone. ${state.status.textContent}`;
    return;
  }
  const saved = state.undoable;
  if (!saved) {
    state.status.textContent = state.request ? "Nothing to undo yet." : "Nothing to undo.";
    return;
  }
  state.undoable = null;
  state.status.textContent = "Undoing...";
  try {
    const res = await api.fetchApi("/physmaster/pick", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: saved.request_id, choice: { undo: true } }) });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      if (res.status === 409) state.undoable = saved;  // not written: it may be tried again
      state.status.textContent = `Not undone: ${body.error ?? res.status}`;
      return;
    }
    state.status.textContent = body.choice?.message ?? "Undone.";
    state.root.dataset.undone = saved.request_id;
  } catch (err) {
    state.undoable = saved;
    state.status.textContent = `Could not send the undo: ${err}`;
  }
}

// --- view -------------------------------------------------------------------------------------------------------
function overlayFor(state, i) {
  return (ctx, W, H, frame) => {
    if (!state.overlay || !state.tracks) return;
    const t = state.tracks[i];
    if (!t) return;
    ctx.lineWidth = Math.max(1.5, W / 160);
    if (t.fit) {  // the ballistic fit the judge scored against: the whole path, thin and dashed
      ctx.strokeStyle = "rgba(60,230,90,0.9)";
      ctx.setLineDash([W / 40, W / 60]);
      ctx.beginPath();
      let pen = false;
      for (const p of t.fit) {
        if (!p) { pen = false; continue; }
        pen ? ctx.lineTo(p[0] * W, p[1] * H) : ctx.moveTo(p[0] * W, p[1] * H);
        pen = true;
      }
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.strokeStyle = "rgba(255,40,40,0.95)";  // what the judge tracked, up to this frame
    ctx.beginPath();
    let pen = false;
    for (let f = 0; f <= frame && f < t.track.length; f++) {
      const p = t.track[f];
      if (!p) { pen = false; continue; }
      pen ? ctx.lineTo(p[0] * W, p[1] * H) : ctx.moveTo(p[0] * W, p[1] * H);
      pen = true;
    }
    ctx.stroke();
    const now = t.track[frame];
    if (now) {
      ctx.fillStyle = "rgba(255,40,40,1)";
      ctx.beginPath();
      ctx.arc(now[0] * W, now[1] * H, Math.max(3, W / 50), 0, 2 * Math.PI);
      ctx.fill();
    } else if (t.track.every((p) => !p)) {
      ctx.fillStyle = "rgba(255,40,40,0.9)";
      ctx.font = `${Math.max(10, W / 18)}px sans-serif`;
      ctx.fillText("judge: no object found", 6, H - 8);
    }
  };
}

function toggleOverlay(state) {
  state.overlay = !state.overlay;
  state.overlayButton.style.outline = state.overlay ? "2px solid #e33" : "";
  state.root.dataset.overlay = String(state.overlay);
  if (state.overlay && !state.tracks && state.request) state.status.textContent = "The judge is still tracking...";
  state.player.drawAll();
}

function toggleFocus(state, index) {
  const req = state.request ?? state.answered;
  if (!req || index < 0 || index >= req.candidates.length) return;
  const at = state.focused.indexOf(index);
  if (at >= 0) state.focused.splice(at, 1);
  else {
    state.focused.push(index);
    if (state.focused.length > 2) state.focused.shift();  // at most two, side by side
  }
  renderFocus(state);
}

function renderFocus(state) {
  const req = state.request ?? state.answered;
  state.player.removeViews((v) => v.enlarged);
  state.focus.replaceChildren();
  state.focus.style.display = state.focused.length && req ? "grid" : "none";
  state.focus.style.gridTemplateColumns = `repeat(${Math.max(1, state.focused.length)}, minmax(0, 1fr))`;
  state.root.dataset.focused = state.focused.join(",");
  if (req) {
    for (const i of state.focused) {
      const view = new SheetView(req.candidates[i], i, { minSide: 512 });
      view.enlarged = true;
      view.overlay = overlayFor(state, i);
      view.canvas.classList.add("physmaster-picker-enlarged");
      view.canvas.title = "click to close";
      view.canvas.addEventListener("click", () => toggleFocus(state, i));
      const role = roleOf(state, i);
      state.focus.append(el("div", { style: "text-align:center;" }, view.canvas,
        el("div", { textContent: `${i + 1}${role ? ` · ${labelOf(role)}` : ""}` })));
      state.player.addView(view);
    }
  }
  measure(state);
}

function labelOf(role) {
  const tie = role.tied ? " (tie)" : "";
  if (role.kind === "best") return `best${tie}`;
  if (role.kind === "worst") return `worst${tie}`;
  return role.kind === "rank" ? `#${role.place}${tie}` : `${role.place}. from the bottom${tie}`;
}

function render(state) {
  const req = state.request ?? state.answered;
  state.ranking.textContent = describeRanking(state);
  if (!req) return;
  for (const v of state.views) {
    const i = v.index;
    const card = v.card;
    const role = roleOf(state, i);
    card.dataset.role = role ? role.kind : "";
    card.dataset.place = role ? String(role.place) : "";
    const colour = !role ? "transparent" : role.kind === "best" ? "#3c3" : role.kind === "rank" ? "#8c4" :
      role.kind === "worst" ? "#d33" : "#d83";
    card.style.borderColor = colour;
    v.label.textContent = `${i + 1}${role ? ` - ${labelOf(role)}` : ""}`;
  }
}

function buildGrid(state) {
  const req = state.request;
  state.grid.replaceChildren();
  state.views = req.candidates.map((file, i) => {
    const view = new SheetView(file, i);
    view.overlay = overlayFor(state, i);
    const card = el("div", { className: "physmaster-picker-candidate",
      style: "border:3px solid transparent;border-radius:4px;text-align:center;font-size:11px;" });
    card.dataset.index = String(i);
    view.canvas.style.cursor = "zoom-in";
    view.canvas.title = "click: enlarge (two side by side)";
    view.canvas.addEventListener("click", () => toggleFocus(state, i));
    const label = el("div", {});
    const buttons = el("div", { className: "physmaster-picker-buttons",
      style: "display:flex;flex-wrap:wrap;gap:2px;justify-content:center;font-size:10px;" },
      button("best", "physmaster-picker-best", () => markButton(state, i, "best"), `key ${i + 1}`),
      button("rank", "physmaster-picker-rank", () => place(state, i, "top"), `next place: key ${i + 1}`),
      button("=", "physmaster-picker-tie", () => { state.tieNext = true; place(state, i, "top"); },
        "tie with the last placed"),
      button("worst", "physmaster-picker-worst", () => markButton(state, i, "worst"), `Shift+${i + 1}`));
    card.append(view.canvas, label, buttons);
    view.card = card;
    view.label = label;
    state.grid.append(card);
    return view;
  });
  state.player.setViews(state.views, req.fps ?? req.candidates[0]?.fps ?? 16);
  render(state);
  measure(state);
}

// the quick path's buttons: "best" changes a lone best; "worst" marks from the bottom
function markButton(state, i, which) {
  if (!state.request) return;
  if (which === "best" && state.top.length === 1 && state.top[0].length === 1 && !state.bottom.length &&
    state.top[0][0] !== i && !placed(state).includes(i)) {
    remember(state);
    state.top = [[i]];
    render(state);
    prompt(state);
    return;
  }
  place(state, i, which === "best" ? "top" : "bottom");
}

function measure(state) {
  requestAnimationFrame(() => {
    state.minHeight = Math.min(4000, state.root.scrollHeight + 8);
    fitNode(state.node, state.root, state.focused.length ? 520 : 400);
  });
}

async function submit(state, choice) {
  const req = state.request;
  if (!req) return;
  state.status.textContent = "Sending...";
  state.request = null;  // one answer per request: later keys do nothing until the next one (except undo)
  state.answered = req;
  state.root.dataset.answer = JSON.stringify(choice);  // what is sent (the status says what became of it)
  try {
    const res = await api.fetchApi("/physmaster/pick", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ request_id: req.request_id, choice }) });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      if (res.status === 400) {  // not accepted: the request still waits, the marks stay
        state.request = req;
        state.status.textContent = `Not accepted: ${body.error ?? res.status}`;
      } else state.status.textContent = `Not accepted: ${body.error ?? res.status}`;
      return;
    }
    // the node says what became of the answer (saved, or not saved and why) in physmaster.pick_done, which
    // may arrive before this response: then its message stays
    if (!state.done || state.done !== req.request_id) state.status.textContent = choice.skip ? "Skipped." : "Sent. Saving...";
  } catch (err) {
    state.request = req;
    state.status.textContent = `Could not send the choice: ${err}`;
  }
}

// --- keys -------------------------------------------------------------------------------------------------------
function typing(e) {
  const t = e.composedPath?.()[0] ?? e.target;
  return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT" || t.isContentEditable);
}

function digit(e) {
  const m = /^(?:Digit|Numpad)([1-9])$/.exec(e.code ?? "");
  return m ? Number(m[1]) - 1 : null;
}

function onKey(e) {
  const state = active;
  if (!state || !state.node.graph || typing(e) || e.ctrlKey || e.metaKey || e.isComposing) return;
  const waiting = !!state.request;
  const req = state.request ?? state.answered;
  if (!req) return;
  if (!waiting) {  // answered: only U (take the saved answer back) stays the picker's
    if ((e.key === "u" || e.key === "U") && state.undoable && !e.altKey) {
      e.preventDefault();
      e.stopImmediatePropagation();
      undo(state);
    }
    return;
  }
  const n = req.candidates.length;
  const i = digit(e);
  const p = state.player;
  let handled = true;
  if (i !== null && e.altKey) toggleFocus(state, i);
  else if (e.altKey) handled = false;
  else if (i !== null && waiting && i < n) place(state, i, e.shiftKey ? "bottom" : "top");
  else if (e.key === "=" && waiting) { state.tieNext = true; state.ranking.textContent = describeRanking(state); }
  else if (e.key === "Enter" && waiting) finishRanking(state);
  else if ((e.key === "u" || e.key === "U") || (e.key === "Backspace" && waiting && state.history.length)) undo(state);
  else if (e.key === " ") p.toggle();
  else if (e.key === "ArrowLeft") p.step(-1);
  else if (e.key === "ArrowRight") p.step(1);
  else if (e.key === "s" || e.key === "S") p.cycleSpeed();
  else if (e.key === "t" || e.key === "T") toggleOverlay(state);
  else if (e.key === "e" || e.key === "E") { state.focused = []; renderFocus(state); }
  else if (e.key === "Escape" && waiting) submit(state, { skip: true });
  else handled = false;
  if (handled) {
    e.preventDefault();
    e.stopImmediatePropagation();
  }
}

app.registerExtension({
  name: "physmaster.preferencePicker",
  setup() {
    window.addEventListener("keydown", onKey, { capture: true });
    api.addEventListener("physmaster.pick", ({ detail }) => {
      const node = nodeByExecutionId(detail.node_id);
      if (!node || node.type !== NODE_TYPE && node.comfyClass !== NODE_TYPE) return;
      const state = ensureWidget(node);
      Object.assign(state, { request: detail, answered: null, undoable: null, tracks: null, top: [], bottom: [],
        tieNext: false, history: [], focused: [], done: null });
      state.root.dataset.requestId = detail.request_id;
      delete state.root.dataset.answer;
      delete state.root.dataset.undone;
      state.root.dataset.tracks = "pending";
      buildGrid(state);
      renderFocus(state);
      prompt(state);
      const secs = Math.round(detail.timeout ?? 0);
      state.status.textContent += ` Waiting up to ${secs}s, then: ${detail.on_timeout}.`;
      active = state;
      node.setDirtyCanvas?.(true, true);
    });
    api.addEventListener("physmaster.pick_tracks", ({ detail }) => {
      const node = nodeByExecutionId(detail.node_id);
      const state = node?.__physmasterPicker;
      const req = state && (state.request ?? state.answered);
      if (!req || req.request_id !== detail.request_id) return;
      state.tracks = detail.tracks;
      state.root.dataset.tracks = detail.tracks ? "ready" : "none";
      if (!detail.tracks) state.overlayButton.title = "the judge could not track these videos";
      state.player.drawAll();
    });
    api.addEventListener("physmaster.pick_done", ({ detail }) => {
      const node = nodeByExecutionId(detail.node_id);
      const state = node?.__physmasterPicker;
      const req = state && (state.request ?? state.answered);
      if (!state || (req && req.request_id !== detail.request_id)) return;
      state.request = null;
      state.done = detail.request_id;
      state.status.textContent = detail.message ?? "Done.";
      render(state);
      if (/^Saved /.test(detail.message ?? "")) {
        state.undoable = { request_id: detail.request_id };
        state.ranking.textContent = `${state.ranking.textContent} — U or Undo takes this answer back.`.replace(/^ — /, "");
      }
    });
  },
});
