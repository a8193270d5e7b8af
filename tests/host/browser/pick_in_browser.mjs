// Opens the real ComfyUI frontend in Debian's chromium, loads a UI-format workflow, queues it from the page (so the
// websocket events reach this browser), waits for the PhysMaster picker to show its candidates inside the node,
// clicks a best and a worst, and saves screenshots. Usage:
//   node pick_in_browser.mjs <base-url> <workflow.json> <out-dir> <best-index> <worst-index> [root|subgraph]
// With "subgraph", the picker node is first converted into a subgraph (the frontend's own command) and the view
// opened inside it, so the node's execution id is "<subgraph node>:<inner node>".
// Prints one JSON line: {"candidates": N, "status": "..."}; exits non-zero on failure.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [url, workflowPath, outDir, best, worst, mode = "root"] = process.argv.slice(2);
const shot = (name) => join(outDir, mode === "root" ? name : name.replace(".png", `_${mode}.png`));
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
try {
  // a first visit opens the templates dialog; a returning user has completed the tutorial
  const set = await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  if (!set.ok) throw new Error(`could not store the frontend setting: HTTP ${set.status}`);
  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, null,
    { timeout: 120000 });
  // our extension registered through the frontend's extension API
  const registered = await page.evaluate(() =>
    (window.app.extensions ?? []).some((e) => e.name === "physmaster.preferencePicker"));
  if (!registered) throw new Error("the physmaster.preferencePicker extension is not registered");
  await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); }, workflow);

  if (mode === "subgraph") {
    await page.evaluate(() => {
      const graph = window.app.graph;
      const inner = graph._nodes.find((n) => n.type === "PhysMasterPreferencePicker");
      const { subgraph, node } = graph.convertToSubgraph(new Set([inner]));
      window.app.canvas.openSubgraph(subgraph, node);
    });
  }
  // centre the view on the picker node so its widget is on screen
  await page.evaluate(() => {
    const node = window.app.canvas.graph._nodes.find((n) => n.type === "PhysMasterPreferencePicker");
    window.app.canvas.ds.scale = 1.0;
    window.app.canvas.centerOnNode(node);
    window.app.canvas.setDirty(true, true);
  });
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  const cards = page.locator(".physmaster-picker-candidate");
  await cards.first().waitFor({ state: "attached", timeout: 600000 });
  const n = await cards.count();
  // every candidate's sheet (a /view file) is loaded and drawn
  await page.waitForFunction(() => [...document.querySelectorAll(".physmaster-picker-candidate canvas")]
    .every((c) => c.dataset.ready === "1" && Number(c.dataset.frame) >= 0), null, { timeout: 60000 });
  await page.screenshot({ path: shot("picker_waiting.png") });
  await page.locator(".physmaster-picker-best").nth(Number(best)).click();
  await page.screenshot({ path: shot("picker_best_marked.png") });
  await page.locator(".physmaster-picker-worst").nth(Number(worst)).click();
  await page.waitForFunction(() => {
    const s = document.querySelector(".physmaster-picker-status");
    return s && /Saved|Done|answered/.test(s.textContent);
  }, null, { timeout: 60000 });
  const status = await page.locator(".physmaster-picker-status").textContent();
  await page.screenshot({ path: shot("picker_saved.png") });
  const nodeIds = await page.evaluate(() => window.app.canvas.graph._nodes
    .filter((n) => n.type === "PhysMasterPreferencePicker").map((n) => n.id));
  console.log(JSON.stringify({ candidates: n, status, errors, mode, nodeIds }));
} catch (e) {
  await page.screenshot({ path: shot("picker_failure.png") }).catch(() => {});
  console.error(String(e), JSON.stringify(errors));
  process.exitCode = 1;
} finally {
  await browser.close();
}
