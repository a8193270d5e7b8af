// Issue 13 in the real ComfyUI frontend (Debian's chromium, playwright-core). Usage:
//   node rank_in_browser.mjs <base-url> <marking.json> <review.json> <out-dir> <stress.json>
// 1. queues the marking workflow (4 candidates); with the focus on the graph canvas, never in the widget: checks
//    that every candidate shows the same frame while playing, paused, stepped (← →) and slowed (S); enlarges two
//    side by side (Alt+2, a click) and shows the judge's trajectories (T); marks best/worst by keys and undoes
//    the saved answer (U).
// 2. queues again and ranks the 4 by keys with a tie (3, 1, =, 4, Enter), counting keys and time.
// 3. loads a graph with PhysMasterPreferenceReview, runs it, drops one pair.
// 4. stress: 8 candidates of 33 frames at 256x256 (sheets the test wrote into the host's temp folder) shown by
//    dispatching a picker event in the page; measures the clock, frame times and key-to-draw latency.
// Screenshots go to <out-dir>. Prints one JSON line with what it saw; exits non-zero on failure.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [url, markingPath, reviewPath, outDir, stressPath] = process.argv.slice(2);
const shot = (name) => join(outDir, name);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1100 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
const out = { errors };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const gridFrames = () => page.evaluate(() =>
  [...document.querySelectorAll(".physmaster-picker-grid canvas")].map((c) => Number(c.dataset.frame)));
const status = () => page.locator(".physmaster-picker-status").textContent();
async function waitStatus(re, timeout = 120000) {
  await page.waitForFunction((src) => new RegExp(src).test(
    document.querySelector(".physmaster-picker-status")?.textContent ?? ""), re.source, { timeout });
  return status();
}
async function centreOn(type, scale = 1.0) {
  await page.evaluate(([t, s]) => {
    const node = window.app.canvas.graph._nodes.find((n) => n.type === t);
    window.app.canvas.ds.scale = s;
    window.app.canvas.centerOnNode(node);
    window.app.canvas.setDirty(true, true);
  }, [type, scale]);
}
async function waitCandidates(previousRequest) {
  await page.waitForFunction((prev) => {
    const root = document.querySelector(".physmaster-picker");
    if (!root || !root.dataset.requestId || root.dataset.requestId === prev) return false;
    const canvases = [...document.querySelectorAll(".physmaster-picker-grid canvas")];
    return canvases.length > 0 && canvases.every((c) => Number(c.dataset.frame) >= 0);
  }, previousRequest ?? null, { timeout: 600000 });
  // the sheets are loaded when the first frame was drawn from them
  await page.waitForFunction(() => [...document.querySelectorAll(".physmaster-picker-grid canvas")]
    .every((c) => c.dataset.ready === "1"), null, { timeout: 60000 });
  return page.evaluate(() => document.querySelector(".physmaster-picker").dataset.requestId);
}
// the focus on the graph canvas, away from the widget: keys must work without clicking into the picker
async function focusGraph() {
  return page.evaluate(() => {
    document.activeElement?.blur?.();
    const canvas = document.getElementById("graph-canvas");
    if (canvas) { canvas.tabIndex = canvas.tabIndex ?? 0; canvas.focus(); }
    return !!document.activeElement?.closest?.(".physmaster-picker");
  });
}
const allEqual = (xs) => xs.length > 0 && xs.every((x) => x === xs[0]);

try {
  const set = await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  if (!set.ok) throw new Error(`could not store the frontend setting: HTTP ${set.status}`);
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
    { timeout: 120000 });
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, JSON.parse(readFileSync(markingPath, "utf8")));
  await centreOn("PhysMasterPreferencePicker", 1.1);
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  let requestId = await waitCandidates(null);
  out.candidates = (await gridFrames()).length;
  out.focusInWidget = await focusGraph();

  // --- 1. one clock ----------------------------------------------------------------------------------------------
  const playing = [];
  for (let k = 0; k < 6; k++) { playing.push(await gridFrames()); await sleep(170); }
  out.syncPlaying = playing.every(allEqual);
  out.advancedWhilePlaying = new Set(playing.map((f) => f[0])).size > 1;
  await page.keyboard.press("Space");
  const paused1 = await gridFrames();
  await sleep(400);
  const paused2 = await gridFrames();
  out.syncPaused = allEqual(paused1) && JSON.stringify(paused1) === JSON.stringify(paused2);
  out.frames = await page.evaluate(() => Number(document.querySelector(".physmaster-picker-frame").textContent.split("/")[1]));
  await page.keyboard.press("ArrowRight");
  await page.keyboard.press("ArrowRight");
  const stepped2 = await gridFrames();
  await page.keyboard.press("ArrowLeft");
  const stepped1 = await gridFrames();
  out.stepRight2 = allEqual(stepped2) && stepped2[0] === (paused2[0] + 2) % out.frames;
  out.stepLeft1 = allEqual(stepped1) && stepped1[0] === (paused2[0] + 1) % out.frames;
  await page.keyboard.press("s");
  await page.keyboard.press("s");
  out.speed = await page.evaluate(() => Number(document.querySelector(".physmaster-picker").dataset.speed));
  await page.keyboard.press("Space");
  const slow = [];
  for (let k = 0; k < 4; k++) { slow.push(await gridFrames()); await sleep(200); }
  out.syncSlow = slow.every(allEqual);

  // enlarge one by a click, then a second by a key (Alt+4): side by side, on the same clock; the judge's tracks (T)
  await page.locator(".physmaster-picker-grid canvas").nth(1).click();  // a click enlarges 2
  await page.keyboard.press("Alt+Digit4");  // and a key shows 4 beside it
  await focusGraph();
  await page.keyboard.press("Space");  // pause for a still screenshot
  out.focused = await page.evaluate(() => document.querySelector(".physmaster-picker").dataset.focused);
  const enlarged = await page.evaluate(() =>
    [...document.querySelectorAll(".physmaster-picker-enlarged")].map((c) => Number(c.dataset.frame)));
  out.enlargedSync = enlarged.length === 2 && allEqual([...enlarged, ...(await gridFrames())]);
  await page.waitForFunction(() => document.querySelector(".physmaster-picker").dataset.tracks !== "pending", null,
    { timeout: 120000 });
  out.tracks = await page.evaluate(() => document.querySelector(".physmaster-picker").dataset.tracks);
  await page.keyboard.press("ArrowRight");
  await page.keyboard.press("t");
  out.overlay = await page.evaluate(() => document.querySelector(".physmaster-picker").dataset.overlay);
  await page.screenshot({ path: shot("picker_enlarged.png") });
  await page.keyboard.press("t");
  await page.keyboard.press("e");
  await page.keyboard.press("Space");

  // a wrong best/worst, saved, then taken back with U
  await page.keyboard.press("Digit1");
  await page.keyboard.press("u");  // the last mark
  out.localUndo = await page.evaluate(() => [...document.querySelectorAll(".physmaster-picker-candidate")]
    .every((c) => !c.dataset.role));
  await page.keyboard.press("Digit1");
  await page.keyboard.press("Shift+Digit2");
  out.quickStatus = (await waitStatus(/^Saved|NOT saved/)).trim();
  await page.keyboard.press("u");
  out.undoStatus = (await waitStatus(/^Undone|Not undone|Could not/)).trim();
  out.undoneRequest = requestId;

  // --- 2. a ranking of 4 with a tie, by keys, back to back ------------------------------------------------------
  // a new seed, as the shipped workflow's "randomize" gives each run (the same inputs would be cached whole)
  await page.evaluate(async () => {
    const ks = window.app.graph._nodes.find((n) => n.type === "KSampler");
    ks.widgets.find((w) => w.name === "seed").value = 12;
    await window.app.queuePrompt(0, 1);
  });
  requestId = await waitCandidates(requestId);
  out.focusInWidget2 = await focusGraph();
  const keys = ["Digit3", "Digit1", "Equal", "Digit4"];
  const t0 = Date.now();
  for (const k of keys) await page.keyboard.press(k);
  const tKeys = Date.now() - t0;
  out.rankingLine = await page.locator(".physmaster-picker-ranking").textContent();
  await page.screenshot({ path: shot("picker_ranking.png") });
  const t1 = Date.now();
  await page.keyboard.press("Enter");
  out.rankKeys = keys.length + 1;
  out.rankKeyMs = tKeys + (Date.now() - t1);
  out.rankAnswer = await page.evaluate(() => document.querySelector(".physmaster-picker").dataset.answer);
  out.rankStatus = (await waitStatus(/^Saved|NOT saved/)).trim();
  out.rankRequest = requestId;
  await page.screenshot({ path: shot("picker_ranking_saved.png") });

  // --- 3. the review node: stats, groups, drop one pair ----------------------------------------------------------
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, JSON.parse(readFileSync(reviewPath, "utf8")));
  await centreOn("PhysMasterPreferenceReview", 1.0);
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  await page.locator(".physmaster-review-group").first().waitFor({ state: "attached", timeout: 300000 });
  await page.waitForFunction(() => [...document.querySelectorAll(".physmaster-review canvas")]
    .every((c) => c.dataset.ready === "1"), null, { timeout: 60000 });
  await sleep(300);
  out.reviewSummary = await page.locator(".physmaster-review-summary").textContent();
  out.reviewGroups = await page.evaluate(() => [...document.querySelectorAll(".physmaster-review-group")]
    .map((g) => ({ dropped: g.dataset.dropped, pairs: [...g.querySelectorAll(".physmaster-review-pair")]
      .map((p) => `${p.dataset.pair}${p.dataset.dropped === "true" ? " dropped" : ""}`),
    previews: g.querySelectorAll("canvas").length })));
  await page.screenshot({ path: shot("review.png") });
  const live = page.locator('.physmaster-review-group[data-dropped="false"] .physmaster-review-pair[data-pair="3>1"] button');
  await live.click();
  await page.waitForFunction(() => /Dropped|Not dropped|Could not/.test(
    document.querySelector(".physmaster-review-status")?.textContent ?? ""), null, { timeout: 60000 });
  out.reviewStatus = await page.locator(".physmaster-review-status").textContent();
  out.reviewSummaryAfter = await page.locator(".physmaster-review-summary").textContent();
  await page.screenshot({ path: shot("review_dropped.png") });

  // --- 4. stress: 8 candidates x 33 frames at 256x256 -------------------------------------------------------------
  const stress = JSON.parse(readFileSync(stressPath, "utf8"));
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, JSON.parse(readFileSync(markingPath, "utf8")));
  await centreOn("PhysMasterPreferencePicker", 1.0);
  await page.evaluate(async (detail) => {
    const node = window.app.graph._nodes.find((n) => n.type === "PhysMasterPreferencePicker");
    const { api } = await import("/scripts/api.js");
    api.dispatchCustomEvent("physmaster.pick", { ...detail, node_id: String(node.id) });
  }, stress);
  await waitCandidates(null);
  await page.waitForFunction(() => document.querySelectorAll(".physmaster-picker-grid canvas").length === 8, null,
    { timeout: 60000 });
  await sleep(500);
  out.stress = await page.evaluate(async () => {
    const root = document.querySelector(".physmaster-picker");
    const start = Number(root.dataset.frame);
    const gaps = [];
    let last = performance.now();
    let longTasks = 0;
    const obs = "PerformanceObserver" in window ? new PerformanceObserver((l) => { longTasks += l.getEntries().length; }) : null;
    try { obs?.observe({ entryTypes: ["longtask"] }); } catch { /* not supported */ }
    const t0 = performance.now();
    let advanced = 0, prev = start, sync = true;
    await new Promise((done) => {
      const tick = (now) => {
        gaps.push(now - last);
        last = now;
        const f = [...document.querySelectorAll(".physmaster-picker-grid canvas")].map((c) => Number(c.dataset.frame));
        if (!f.every((x) => x === f[0])) sync = false;
        if (f[0] !== prev) { advanced += (f[0] - prev + 33) % 33; prev = f[0]; }
        if (now - t0 < 3000) requestAnimationFrame(tick); else done();
      };
      requestAnimationFrame(tick);
    });
    obs?.disconnect();
    const seconds = (performance.now() - t0) / 1000;
    // key to draw: a step is drawn before the key handler returns
    const k0 = performance.now();
    window.dispatchEvent(new KeyboardEvent("keydown", { key: " ", code: "Space", bubbles: true }));
    window.dispatchEvent(new KeyboardEvent("keydown", { key: "ArrowRight", code: "ArrowRight", bubbles: true }));
    const keyMs = performance.now() - k0;
    const frames = [...document.querySelectorAll(".physmaster-picker-grid canvas")].map((c) => Number(c.dataset.frame));
    gaps.sort((a, b) => a - b);
    return { seconds, advanced, wanted: seconds * Number(root.dataset.speed) * 16, sync, longTasks,
      rafs: gaps.length, p50FrameMs: gaps[Math.floor(gaps.length / 2)], maxFrameMs: gaps[gaps.length - 1],
      keyMs, steppedSync: frames.every((x) => x === frames[0]) };
  });
  await page.screenshot({ path: shot("picker_stress_8x33.png") });
  console.log(JSON.stringify(out));
} catch (e) {
  await page.screenshot({ path: shot("rank_failure.png") }).catch(() => {});
  console.error(String(e), JSON.stringify(out));
  process.exitCode = 1;
} finally {
  await browser.close();
}
