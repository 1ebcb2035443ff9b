// Live training view: the training node (TrainDiceRefiner) reports each step over the websocket
// ("cfg_distill.train.progress" {node, step, total, loss, eta_s, elapsed_s}) and once at the end
// ("cfg_distill.train.done" {node, final_loss, file, cancelled, steps}), and at the start, every tenth
// of the run and at the end a held-out progress check ("cfg_distill.train.check" {node, step, total,
// ratio, text}: the share of the start's gap to CFG left on samples the run never trains on). We draw
// step, loss, ETA, a small loss curve and the latest check on the node the server names, so a long
// run can be watched without the console, and stopped early knowingly.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

export const EXTENSION = "cfg_distill.training_view";
const TRAIN_NODES = new Set(["TrainDiceRefiner", "TrainTeEFusion"]);
const MAX_POINTS = 400; // the curve keeps its shape by halving its resolution past this
const views = new WeakMap(); // node -> view

const STYLE = `
.cfgd-train { font: 12px sans-serif; color: var(--input-text, #ddd); padding: 4px 6px;
  display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; height: 100%; }
.cfgd-train .cfgd-status { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.cfgd-train .cfgd-bar { height: 4px; background: #333; border-radius: 2px; overflow: hidden; }
.cfgd-train .cfgd-bar > div { height: 100%; width: 0; background: #4caf50; }
.cfgd-train svg { flex: 1; min-height: 40px; width: 100%; background: #1b1b1b; border-radius: 4px; }
.cfgd-train polyline { fill: none; stroke: #ffb74d; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.cfgd-train .cfgd-check { color: #90caf9; overflow-wrap: anywhere; }
.cfgd-train .cfgd-done { color: #81c784; overflow-wrap: anywhere; }
.cfgd-train .cfgd-done.cancelled { color: #e57373; }
`;

function injectStyle() {
  if (document.getElementById("cfgd-train-style")) return;
  const el = document.createElement("style");
  el.id = "cfgd-train-style";
  el.textContent = STYLE;
  document.head.append(el);
}

function clock(seconds) {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

function fmtLoss(x) {
  return Number.isFinite(x) ? (Math.abs(x) >= 0.01 ? x.toFixed(4) : x.toExponential(2)) : String(x);
}

// The server names nodes by execution id: "12" on the root graph, "5:12" inside subgraph node 5.
function nodeForExecutionId(id) {
  let graph = app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(Number.isNaN(Number(part)) ? part : Number(part));
    graph = node?.subgraph;
  }
  return node;
}

function el(tag, cls, parent) {
  const ns = tag === "svg" || tag === "polyline" ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml";
  const e = document.createElementNS(ns, tag);
  if (cls) e.setAttribute("class", cls);
  parent?.append(e);
  return e;
}

function createView(node) {
  injectStyle();
  const root = el("div", "cfgd-train");
  const status = el("div", "cfgd-status", root);
  status.textContent = "not trained yet: queue the workflow to train";
  const bar = el("div", "cfgd-bar", root);
  const fill = el("div", "", bar);
  const svg = el("svg", "", root);
  svg.setAttribute("viewBox", "0 0 100 100");
  svg.setAttribute("preserveAspectRatio", "none");
  const line = el("polyline", "", svg);
  const check = el("div", "cfgd-check", root);
  const done = el("div", "cfgd-done", root);
  const widget = node.addDOMWidget("cfg_distill_training", "cfg_distill_training", root, {
    serialize: false, // a view, not a value: never saved in the workflow or sent to the server
    hideOnZoom: false,
    getMinHeight: () => 110,
  });
  widget.serialize = false;
  const view = { node, root, status, fill, line, check, done, widget, points: [], stride: 1, lastStep: 0, finished: false };
  views.set(node, view);
  fit(node);
  return view;
}

// Room for the curve without shrinking a node the user made larger (also after a saved size loads).
function fit(node) {
  const [w, h] = node.size;
  const min = node.computeSize?.() ?? [w, h];
  if (w < 300 || h < min[1]) node.setSize([Math.max(w, 300), Math.max(h, min[1])]);
}

function viewFor(node) {
  return views.get(node) ?? createView(node);
}

function drawCurve(view) {
  const pts = view.points;
  if (pts.length < 1) {
    view.line.setAttribute("points", "");
    return;
  }
  // Log scale when the loss spans decades (the usual shape of a training curve).
  const ys = pts.map(([, y]) => y);
  const useLog = ys.every((y) => y > 0) && Math.max(...ys) / Math.min(...ys) > 20;
  const f = useLog ? Math.log10 : (y) => y;
  const fy = ys.map(f);
  const lo = Math.min(...fy);
  const hi = Math.max(...fy);
  const x0 = pts[0][0];
  const x1 = Math.max(pts[pts.length - 1][0], x0 + 1);
  const coords = pts.map(([x], i) => {
    const px = ((x - x0) / (x1 - x0)) * 100;
    const py = hi > lo ? 95 - ((fy[i] - lo) / (hi - lo)) * 90 : 50;
    return `${px.toFixed(2)},${py.toFixed(2)}`;
  });
  view.line.setAttribute("points", coords.join(" "));
}

function onProgress({ detail }) {
  const node = nodeForExecutionId(detail?.node);
  if (!node) return; // another workflow tab, or the node was deleted: nothing to draw on
  const view = viewFor(node);
  if (view.lastStep === 0) fit(node);
  const { step, total, loss, eta_s, elapsed_s } = detail;
  if (view.finished || step <= view.lastStep) {
    // A new run on the same node: start a fresh curve.
    view.points = [];
    view.stride = 1;
    view.done.textContent = "";
    view.check.textContent = "";
    view.done.classList.remove("cancelled");
    view.finished = false;
  }
  view.lastStep = step;
  if (step % view.stride === 0 || view.points.length === 0) view.points.push([step, loss]);
  if (view.points.length > MAX_POINTS) {
    view.points = view.points.filter((_, i) => i % 2 === 0);
    view.stride *= 2;
  }
  view.status.textContent =
    `step ${step}/${total} · loss ${fmtLoss(loss)} · ETA ${clock(eta_s)} · elapsed ${clock(elapsed_s)}`;
  view.fill.style.width = `${total > 0 ? Math.min(100, (100 * step) / total) : 0}%`;
  Object.assign(view.root.dataset, { step, total, loss, state: "running" });
  drawCurve(view);
  node.setDirtyCanvas?.(true, false);
}

function onCheck({ detail }) {
  const node = nodeForExecutionId(detail?.node);
  if (!node) return;
  const view = viewFor(node);
  if (detail.step === 0) {
    // A new run's first check comes before its first step: start its fresh curve here.
    Object.assign(view, { points: [], stride: 1, lastStep: 0, finished: false });
    view.done.textContent = "";
    view.done.classList.remove("cancelled");
    drawCurve(view);
  }
  view.check.textContent = String(detail.text ?? "");
  Object.assign(view.root.dataset, { checkStep: detail.step, checkRatio: detail.ratio ?? "" });
  node.setDirtyCanvas?.(true, false);
}

function onDone({ detail }) {
  const node = nodeForExecutionId(detail?.node);
  if (!node) return;
  const view = viewFor(node);
  const { final_loss, file, cancelled, steps } = detail;
  const saved = file ? ` · saved ${String(file).split(/[\\/]/).pop()}` : "";
  view.done.textContent = cancelled
    ? `cancelled after ${steps} steps${saved}`
    : `done: ${steps} steps · final loss ${fmtLoss(final_loss)}${saved}`;
  view.done.classList.toggle("cancelled", !!cancelled);
  if (!cancelled) view.fill.style.width = "100%";
  const state = cancelled ? "cancelled" : "done";
  Object.assign(view.root.dataset, { state, finalLoss: final_loss, file: file ?? "" });
  view.finished = true; // the next progress event starts a new curve
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    api.addEventListener("cfg_distill.train.progress", onProgress);
    api.addEventListener("cfg_distill.train.done", onDone);
    api.addEventListener("cfg_distill.train.check", onCheck);
  },
  nodeCreated(node) {
    // The training node shows its (empty) view from the start; any other node only if the server
    // names it in an event.
    if (TRAIN_NODES.has(node.comfyClass ?? node.type)) viewFor(node);
  },
  viewOf: (node) => {
    const v = views.get(node);
    return v && { text: v.status.textContent, done: v.done.textContent, check: v.check.textContent,
      points: v.points.length, ...v.root.dataset };
  },
});
