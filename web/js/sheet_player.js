// Shared by the PhysMaster picker and review widgets (no extension is registered here): node lookup through the
// graph API, /view URLs of the host's preview files, and a Player that draws candidate videos from sprite sheets
// on one clock, so every candidate shows the same frame index at every moment (pause, step, slow motion).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const SPEEDS = [1, 0.5, 0.25];

// "12" or "5:12" (a node inside subgraph node 5) -> the LGraphNode, using only public graph methods.
export function nodeByExecutionId(executionId) {
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

export function viewUrl(file) {
  const q = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder ?? "", type: file.type });
  return api.apiURL(`/view?${q}`);
}

export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") e.style.cssText = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
}

// Grow the node so its DOM widget's content fits (never shrinks what the person sized).
export function fitNode(node, root, minWidth) {
  requestAnimationFrame(() => {
    const want = [Math.max(node.size[0], minWidth), node.size[1]];
    const need = node.computeSize?.() ?? want;
    want[1] = Math.max(want[1], need[1]);
    if (want[0] !== node.size[0] || want[1] !== node.size[1]) node.setSize?.(want);
    node.setDirtyCanvas?.(true, true);
  });
}

// One candidate video drawn from its sprite sheet onto a canvas; `overlay(ctx, w, h, frame)` draws on top.
export class SheetView {
  constructor(file, index, { minSide = 256 } = {}) {
    this.file = file;
    this.index = index;
    this.frames = Math.max(1, file.frames ?? 1);
    const w = file.width ?? 64, h = file.height ?? 64;
    const k = Math.max(1, Math.ceil(minSide / Math.max(w, h)));  // crisp overlays on small frames
    this.canvas = el("canvas", { className: "physmaster-sheet", width: w * k, height: h * k,
      style: "width:100%;display:block;image-rendering:pixelated;background:#111;" });
    this.canvas.dataset.index = String(index);
    this.canvas.dataset.frame = "-1";
    this.scale = k;
    this.img = new Image();
    this.ready = false;
    this.img.onload = () => { this.ready = true; this.canvas.dataset.ready = "1"; this.draw(this.lastFrame ?? 0); };
    this.img.src = viewUrl(file);
    this.overlay = null;
    this.lastFrame = 0;
  }

  draw(frame) {
    this.lastFrame = frame;
    const f = Math.min(frame, this.frames - 1);
    const ctx = this.canvas.getContext("2d");
    const { width: W, height: H } = this.canvas;
    ctx.imageSmoothingEnabled = this.scale === 1;
    if (this.ready) {
      const w = this.file.width, h = this.file.height, cols = this.file.cols ?? 1;
      ctx.drawImage(this.img, (f % cols) * w, Math.floor(f / cols) * h, w, h, 0, 0, W, H);
    } else {
      ctx.fillStyle = "#111";
      ctx.fillRect(0, 0, W, H);
    }
    this.overlay?.(ctx, W, H, f);
    this.canvas.dataset.frame = String(f);
  }
}

// One clock for a set of SheetViews: frame index = the same for all; loops; pause, step, speed.
export class Player {
  constructor(onChange) {
    this.views = [];
    this.frame = 0;
    this.frames = 1;
    this.fps = 16;
    this.speed = 1;
    this.playing = true;
    this.onChange = onChange;
    this._acc = 0;
    this._last = null;
    this._raf = null;
  }

  setViews(views, fps) {
    this.views = views;
    this.frames = Math.max(1, ...views.map((v) => v.frames));
    this.fps = fps || 16;
    this.frame = 0;
    this._acc = 0;
    this.drawAll();
    this.run();
  }

  addView(view) {  // a second view of a candidate (the enlarged one) on the same clock
    this.views.push(view);
    view.draw(this.frame);
  }

  removeViews(pred) {
    this.views = this.views.filter((v) => !pred(v));
  }

  drawAll() {
    for (const v of this.views) v.draw(this.frame);
    this.onChange?.(this);
  }

  run() {
    if (this._raf !== null) return;
    const tick = (now) => {
      this._raf = null;
      // the widget may be mounted a moment after its canvases are made: stop only when none has been on the page
      // for 5 s (the node was removed); any control starts the clock again
      if (!this.views.some((v) => v.canvas.isConnected)) {
        this._detached ??= now;
        if (now - this._detached > 5000) { this._last = null; this._detached = null; return; }
      } else this._detached = null;
      if (this.playing && this._last !== null) {
        this._acc += ((now - this._last) / 1000) * this.fps * this.speed;
        if (this._acc >= 1) {
          const n = Math.floor(this._acc);
          this._acc -= n;
          this.frame = (this.frame + n) % this.frames;
          this.drawAll();
        }
      }
      this._last = now;
      this._raf = requestAnimationFrame(tick);
    };
    this._raf = requestAnimationFrame(tick);
  }

  toggle() {
    this.playing = !this.playing;
    this._acc = 0;
    this.onChange?.(this);
    this.run();
  }

  step(delta) {
    this.playing = false;
    this.frame = (((this.frame + delta) % this.frames) + this.frames) % this.frames;
    this.drawAll();
  }

  cycleSpeed() {
    this.speed = SPEEDS[(SPEEDS.indexOf(this.speed) + 1) % SPEEDS.length];
    this.onChange?.(this);
  }

  setSpeed(speed) {
    if (SPEEDS.includes(speed)) this.speed = speed;
    this.onChange?.(this);
  }

  describe() {
    const speed = this.speed === 1 ? "1×" : this.speed === 0.5 ? "½×" : "¼×";
    return `${this.playing ? "playing" : "paused"} · frame ${this.frame + 1}/${this.frames} · ${speed}`;
  }
}
