// PhysMaster preference review: shows what PhysMasterPreferenceReview listed (the dataset's stats, its groups with
// their pairs, and, when the node had a VAE, the candidates playing on one clock) inside the node, and drops a
// wrong pair or a whole group through POST /physmaster/review (the node appends a tombstone; nothing is rewritten).
// Registered through the frontend's extension API only; the node is found through the graph API (subgraphs too).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { el, fitNode, nodeByExecutionId, Player, SheetView } from "./sheet_player.js";

const NODE_TYPE = "PhysMasterPreferenceReview";
const WIDGET = "physmaster_review";

function ensureWidget(node) {
  let state = node.__physmasterReview;
  if (state) return state;
  const root = el("div", { className: "physmaster-review",
    style: "display:flex;flex-direction:column;gap:6px;padding:4px;overflow:auto;font-size:12px;" +
      "color:var(--input-text, #ddd);" });
  const status = el("div", { className: "physmaster-review-status", style: "min-height:1.2em;" });
  const stats = el("div", { className: "physmaster-review-stats" });
  const groups = el("div", { className: "physmaster-review-groups", style: "display:flex;flex-direction:column;gap:8px;" });
  root.append(status, stats, groups);
  node.addDOMWidget(WIDGET, "physmaster-review", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => Math.max(120, state?.minHeight ?? 120) });
  state = { node, root, status, stats, groups, listing: null, minHeight: 120 };
  state.player = new Player();
  node.__physmasterReview = state;
  return state;
}

function statsText(s) {
  const sizes = Object.entries(s.candidates_per_group).map(([k, v]) => `${v}×${k}`).join(", ") || "none";
  return [`${s.groups} group${s.groups === 1 ? "" : "s"}, ${s.pairs} pair${s.pairs === 1 ? "" : "s"} ` +
    `(${s.human} human, ${s.judge} judge)`, `candidates per group: ${sizes}`,
  s.dropped || s.dropped_groups ? `${s.dropped} pair${s.dropped === 1 ? "" : "s"} dropped` +
    (s.dropped_groups ? ` (${s.dropped_groups} whole group${s.dropped_groups === 1 ? "" : "s"})` : "") : ""]
    .filter(Boolean).join(" · ");
}

function render(state) {
  const listing = state.listing;
  state.root.dataset.token = listing.token;
  state.stats.replaceChildren(el("div", { className: "physmaster-review-summary", textContent: statsText(listing.stats),
    style: "font-weight:bold;" }));
  for (const p of listing.stats.problems ?? []) {
    state.stats.append(el("div", { textContent: `skipped: ${p}`, style: "color:#e96;font-size:11px;" }));
  }
  if (listing.shown < listing.total_groups) {
    state.stats.append(el("div", { textContent: `showing the newest ${listing.shown} of ${listing.total_groups} groups`,
      style: "opacity:0.7;" }));
  }
  const views = [];
  state.groups.replaceChildren(...listing.groups.map((g) => {
    const head = el("div", { style: "display:flex;gap:6px;align-items:center;" },
      el("b", { textContent: `Group ${g.id.slice(0, 8)}` }),
      el("span", { textContent: `${g.candidates ?? "?"} candidates · ${g.created.slice(0, 19).replace("T", " ")}` }),
      g.dropped ? el("span", { textContent: "dropped", style: "color:#e66;" }) :
        el("button", { className: "physmaster-review-drop-group", textContent: "Drop group",
          onclick: () => drop(state, { group: g.id }) }));
    const box = el("div", { className: "physmaster-review-group", style: "border:1px solid #555;border-radius:4px;" +
      `padding:4px;${g.dropped ? "opacity:0.5;" : ""}` }, head);
    box.dataset.group = g.id;
    box.dataset.dropped = String(g.dropped);
    if (g.problem) box.append(el("div", { textContent: g.problem, style: "color:#e96;" }));
    if (g.previews) {
      const strip = el("div", { style: "display:grid;grid-template-columns:repeat(auto-fill,minmax(72px,1fr));gap:3px;" });
      g.previews.forEach((file, i) => {
        const view = new SheetView(file, i, { minSide: 128 });
        views.push(view);
        strip.append(el("div", { style: "text-align:center;font-size:10px;" }, view.canvas, el("div", { textContent: `${i + 1}` })));
      });
      box.append(strip);
    }
    for (const p of g.pairs) {
      const row = el("div", { className: "physmaster-review-pair",
        style: `display:flex;gap:6px;align-items:center;${p.dropped ? "text-decoration:line-through;opacity:0.5;" : ""}` },
      el("span", { textContent: `${p.winner + 1} > ${p.loser + 1}`, style: "min-width:3.5em;font-weight:bold;" }),
      el("span", { textContent: `${p.source} · margin ${p.margin.toFixed(2)}` }),
      p.dropped || g.dropped ? el("span", { textContent: "dropped" }) :
        el("button", { className: "physmaster-review-drop-pair", textContent: "Drop",
          onclick: () => drop(state, { group: g.id, winner: p.winner, loser: p.loser, source: p.source,
            created: p.created }) }));
      row.dataset.pair = `${p.winner}>${p.loser}`;
      row.dataset.dropped = String(p.dropped);
      box.append(row);
    }
    if (!g.pairs.length) box.append(el("div", { textContent: "no pairs", style: "opacity:0.6;" }));
    return box;
  }));
  if (views.length) state.player.setViews(views, listing.groups.find((g) => g.previews)?.previews[0]?.fps ?? 16);
  requestAnimationFrame(() => {
    state.minHeight = Math.min(2400, state.root.scrollHeight + 8);
    fitNode(state.node, state.root, 420);
  });
}

async function drop(state, what) {
  state.status.textContent = "Dropping...";
  try {
    const res = await api.fetchApi("/physmaster/review", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: state.listing.token, drop: what }) });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      state.status.textContent = `Not dropped: ${body.error ?? res.status}`;
      return;
    }
    state.listing = body.review;
    state.status.textContent = body.message;
    render(state);
  } catch (err) {
    state.status.textContent = `Could not send the drop: ${err}`;
  }
}

app.registerExtension({
  name: "physmaster.preferenceReview",
  setup() {
    api.addEventListener("executed", ({ detail }) => {
      const listing = detail?.output?.physmaster_review?.[0];
      if (!listing) return;
      const node = nodeByExecutionId(detail.node ?? detail.display_node);
      if (!node || node.type !== NODE_TYPE && node.comfyClass !== NODE_TYPE) return;
      const state = ensureWidget(node);
      state.listing = listing;
      state.status.textContent = `Dataset ${listing.dataset}: drop a wrong pair or a whole group (a tombstone is ` +
        "appended; training and the stats leave it out).";
      render(state);
    });
  },
});
