// cfg guard: DICE / TeEFusion conditioning already carries the guidance, so the sampler must run at
// cfg exactly 1.0 (ComfyUI then skips the negative pass: one model call per step). At any other cfg,
// or with a *_cfg_pp sampler, it runs two passes and guides twice. This module marks such samplers
// and guiders on the canvas and offers a one-click fix.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

export const EXTENSION = "cfg_distill.cfg_guard";

// Nodes whose CONDITIONING output is "one-pass" conditioning.
const SOURCES = { DiceRefinerApply: "DICE", TeEFusionConditioning: "TeEFusion" };
// Conditioning rewriters that keep what flows through them (combine, area, timestep range, controlnet...).
// ConditioningZeroOut is excluded: its output no longer carries the prompt.
const PASS_THROUGH = [/^Conditioning(?!ZeroOut$)/, /^ControlNetApply/];
const MODE_NEVER = 2; // muted: nothing flows
const MODE_BYPASS = 4; // bypassed: inputs flow to outputs of the same type
const FIX_BUTTON = "cfg_distill_fix";
const state = new WeakMap(); // node -> { problems, source, button }

function isOnePassSource(node) {
  return node.mode !== MODE_BYPASS && Object.hasOwn(SOURCES, node.type);
}

function passesThrough(node) {
  return node.type === "Reroute" || PASS_THROUGH.some((re) => re.test(node.type ?? ""));
}

// Which input slots can feed output `slot` of `node` (only called for nodes that pass conditioning on).
function feedingInputs(node, slot) {
  const inputs = node.inputs ?? [];
  if (node.type === "Reroute") return [0];
  const outType = node.outputs?.[slot]?.type;
  const typed = inputs.map((inp, i) => (inp.type === outType ? i : -1)).filter((i) => i >= 0);
  if (node.mode === MODE_BYPASS) return typed;
  // ControlNetApplyAdvanced maps positive->positive, negative->negative: follow the same name.
  const outName = node.outputs?.[slot]?.name;
  const same = typed.filter((i) => inputs[i].name === outName);
  return same.length ? same : typed;
}

// Follow a link upstream; returns the DICE/TeEFusion node it comes from, or null.
function traceSource(graph, nodeId, slot, seen) {
  const node = graph?.getNodeById(nodeId);
  if (!node) return null;
  const key = `${graph.id ?? "root"}:${nodeId}:${slot}`;
  if (seen.has(key)) return null;
  seen.add(key);
  if (node.mode === MODE_NEVER) return null;
  if (isOnePassSource(node)) return node;
  if (node.isSubgraphNode?.() && node.mode !== MODE_BYPASS) {
    // Look inside the subgraph at what feeds this output.
    for (const link of node.subgraph?.outputNode?.slots?.[slot]?.getLinks?.() ?? []) {
      const found = traceSource(node.subgraph, link.origin_id, link.origin_slot, seen);
      if (found) return found;
    }
    return null;
  }
  if (node.mode !== MODE_BYPASS && !passesThrough(node)) return null;
  for (const i of feedingInputs(node, slot)) {
    const link = node.getInputLink(i);
    if (!link) continue;
    const found = traceSource(graph, link.origin_id, link.origin_slot, seen);
    if (found) return found;
  }
  return null;
}

function upstreamNode(node, inputIndex) {
  // The producing node of an input, skipping legacy Reroute nodes.
  let link = node.getInputLink(inputIndex);
  let n = link && node.graph.getNodeById(link.origin_id);
  for (let hops = 0; n && n.type === "Reroute" && hops < 64; hops++) {
    link = n.getInputLink(0);
    n = link && n.graph.getNodeById(link.origin_id);
  }
  return n ?? null;
}

function conditioningSource(node) {
  const inputs = node.inputs ?? [];
  for (let i = 0; i < inputs.length; i++) {
    const link = node.getInputLink(i);
    if (!link) continue;
    if (inputs[i].type === "CONDITIONING") {
      const found = traceSource(node.graph, link.origin_id, link.origin_slot, new Set());
      if (found) return found;
    } else if (inputs[i].type === "GUIDER") {
      // SamplerCustomAdvanced: the guider holds the conditioning.
      const guider = upstreamNode(node, i);
      const found = guider && guider.mode !== MODE_BYPASS && conditioningSource(guider);
      if (found) return found;
    }
  }
  return null;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name) ?? null;
}

// The widget that really decides a value: when the widget is converted to an input and fed by a
// primitive node, that primitive's widget; null when the value comes from an unknown computation.
function effectiveWidget(node, name) {
  const w = widget(node, name);
  // isInputConnected, not input.link: newer frontends deprecate reading the slot's link directly.
  const i = (node.inputs ?? []).findIndex((inp, slot) => inp.name === name && node.isInputConnected(slot));
  if (i < 0) return w ? { node, widget: w } : null;
  const src = upstreamNode(node, i);
  const pw = src?.widgets?.find((x) => typeof x.value === typeof w?.value) ?? null;
  return src && pw && /^Primitive/.test(src.type) ? { node: src, widget: pw } : null;
}

function isCfgPp(name) {
  return typeof name === "string" && /_cfg_?pp$/i.test(name);
}

function plainSampler(w) {
  const base = w.value.replace(/_cfg_?pp$/i, "");
  const values = w.options?.values;
  const list = typeof values === "function" ? values() : values;
  return Array.isArray(list) && list.includes(base) ? base : null;
}

function fmt(v) {
  return Number.isInteger(v) ? v.toFixed(1) : String(+v.toFixed(4));
}

// Problems of one node: [{ text, fix() | null, fixLabel }]; empty when the node is fine or unrelated.
export function diagnose(node) {
  const source = node.graph ? conditioningSource(node) : null;
  if (!source) return { source: null, problems: [] };
  const label = SOURCES[source.type];
  const problems = [];
  const cfg = effectiveWidget(node, "cfg");
  if (cfg && typeof cfg.widget.value === "number" && Math.abs(cfg.widget.value - 1) > 1e-9) {
    problems.push({
      text: `cfg ${fmt(cfg.widget.value)} guides twice and runs 2 passes/step: ${label} needs cfg 1.0`,
      fix: () => setWidget(cfg.node, cfg.widget, 1.0),
      fixLabel: "cfg 1.0",
    });
  }
  const samplers = [];
  const own = effectiveWidget(node, "sampler_name");
  if (own) samplers.push(own);
  (node.inputs ?? []).forEach((inp, i) => {
    if (inp.type !== "SAMPLER") return;
    const src = upstreamNode(node, i);
    if (!src || src.mode === MODE_NEVER) return;
    const sw = effectiveWidget(src, "sampler_name");
    if (sw) samplers.push(sw);
    else if (/cfg_?pp/i.test(src.type)) samplers.push({ node: src, widget: null, name: src.type });
  });
  for (const s of samplers) {
    const name = s.widget ? s.widget.value : s.name;
    if (!isCfgPp(name) && s.widget) continue;
    const plain = s.widget && plainSampler(s.widget);
    problems.push({
      text: `${name} always runs the negative pass: use ${plain ?? "a non-cfg_pp sampler"} at cfg 1.0`,
      fix: plain ? () => setWidget(s.node, s.widget, plain) : null,
      fixLabel: plain,
    });
  }
  return { source, problems };
}

function setWidget(node, w, value) {
  // setValue runs the widget callback and node.onWidgetChanged like a user edit does.
  if (typeof w.setValue === "function") w.setValue(value, { node, canvas: app.canvas });
  else {
    w.value = value;
    w.callback?.(value, app.canvas, node);
  }
}

export function fixNode(node) {
  const { problems } = diagnose(node);
  for (const p of problems) p.fix?.();
  evaluateAll();
  app.graph?.setDirtyCanvas(true, true);
}

// ---- evaluation over the whole graph (cheap: a few link hops per sampler) ----------------------
function allGraphs() {
  const root = app.graph;
  if (!root) return [];
  return [root, ...(root.subgraphs?.values?.() ?? [])];
}

function makeButton(node) {
  const btn = node.addTitleButton({ name: FIX_BUTTON, text: "set cfg 1.0", fontSize: 12 });
  // Draw our own pill (the stock button only draws an icon glyph); hit-testing stays the frontend's.
  btn.getWidth = (ctx) => {
    const font = ctx.font;
    ctx.font = "bold 12px sans-serif";
    const w = ctx.measureText(btn.text).width + 16;
    ctx.font = font;
    return w;
  };
  btn.draw = (ctx, x, y) => {
    const w = btn.getWidth(ctx);
    const h = 20;
    const top = y + (btn.height - h) / 2;
    btn._last_area[0] = x;
    btn._last_area[1] = top;
    btn._last_area[2] = w;
    btn._last_area[3] = h;
    const { font, fillStyle, textAlign, textBaseline } = ctx;
    ctx.fillStyle = "#2e7d32";
    ctx.beginPath();
    ctx.roundRect(x, top, w, h, 6);
    ctx.fill();
    ctx.fillStyle = "#fff";
    ctx.font = "bold 12px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(btn.text, x + w / 2, top + h / 2 + 1);
    Object.assign(ctx, { font, fillStyle, textAlign, textBaseline });
  };
  return btn;
}

function applyState(node, result) {
  const prev = state.get(node);
  const flagged = result.problems.length > 0;
  let button = prev?.button ?? null;
  const fixable = result.problems.some((p) => p.fix);
  if (flagged && fixable && !button) button = makeButton(node);
  // The button says what the click will set: "set cfg 1.0", "set euler", "set cfg 1.0 + euler".
  if (button) button.text = `set ${result.problems.filter((p) => p.fix).map((p) => p.fixLabel).join(" + ")}`;
  if ((!flagged || !fixable) && button) {
    node.title_buttons = (node.title_buttons ?? []).filter((b) => b !== button);
    button = null;
  }
  state.set(node, { ...result, button });
  return (prev?.problems.length ?? 0) !== result.problems.length ||
    prev?.problems.map((p) => p.text).join() !== result.problems.map((p) => p.text).join();
}

let scheduled = false;
export function evaluateAll() {
  scheduled = false;
  let changed = false;
  for (const graph of allGraphs()) {
    for (const node of graph.nodes ?? graph._nodes ?? []) {
      if (!node.constructor?.cfgDistillGuarded) continue;
      // Muted or bypassed samplers do not run: nothing to warn about.
      const idle = node.mode === MODE_NEVER || node.mode === MODE_BYPASS;
      let result = { source: null, problems: [] };
      try {
        if (!idle) result = diagnose(node);
      } catch (e) {
        console.warn(`${EXTENSION}: could not check node ${node.id}`, e); // never break drawing
      }
      changed = applyState(node, result) || changed;
    }
  }
  if (changed) app.graph?.setDirtyCanvas(true, true);
  return changed;
}

function schedule() {
  if (scheduled) return;
  scheduled = true;
  queueMicrotask(evaluateAll);
}

// ---- drawing --------------------------------------------------------------------------------
function drawWarning(node, ctx) {
  const s = state.get(node);
  if (!s?.problems.length || node.flags?.collapsed) return;
  const titleH = LiteGraph.NODE_TITLE_HEIGHT;
  const [w, h] = node.size;
  const { font, fillStyle, strokeStyle, lineWidth, textBaseline, textAlign } = ctx;
  // Red outline: visible even when zoomed out.
  ctx.strokeStyle = "#e53935";
  ctx.lineWidth = 3;
  ctx.beginPath();
  ctx.roundRect(-2, -titleH - 2, w + 4, h + titleH + 4, 10);
  ctx.stroke();
  // One-line explanation above the title, badge style (several problems: the first, plus a count).
  const more = s.problems.length > 1 ? `  (+${s.problems.length - 1} more)` : "";
  const text = `⚠ ${s.problems[0].text}${more}`;
  ctx.font = "13px sans-serif";
  const tw = ctx.measureText(text).width + 14;
  const top = -titleH - 28;
  ctx.fillStyle = "#b71c1c";
  ctx.beginPath();
  ctx.roundRect(0, top, tw, 22, 6);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  ctx.fillText(text, 7, top + 12);
  Object.assign(ctx, { font, fillStyle, strokeStyle, lineWidth, textBaseline, textAlign });
}

const seenVersion = new WeakMap(); // graph -> graph._version at the last check
const RECHECK_MS = 250; // changes that bump no version (bypass/mute toggles) are caught by redraws
let lastCheck = 0;

function guardNodeType(nodeType) {
  const proto = nodeType.prototype;
  nodeType.cfgDistillGuarded = true;
  const onDrawForeground = proto.onDrawForeground;
  proto.onDrawForeground = function (ctx, ...rest) {
    const r = onDrawForeground?.apply(this, [ctx, ...rest]);
    // Any edit bumps graph._version (widgets, links, nodes): re-check lazily on the next draw.
    const g = this.graph;
    const now = performance.now();
    if ((g && seenVersion.get(g) !== g._version) || now - lastCheck > RECHECK_MS) {
      if (g) seenVersion.set(g, g._version);
      lastCheck = now;
      schedule();
    }
    drawWarning(this, ctx);
    return r;
  };
  const onTitleButtonClick = proto.onTitleButtonClick;
  proto.onTitleButtonClick = function (button, canvas) {
    if (button?.name === FIX_BUTTON) return fixNode(this);
    return onTitleButtonClick?.call(this, button, canvas);
  };
  const onConnectionsChange = proto.onConnectionsChange;
  proto.onConnectionsChange = function (...args) {
    schedule();
    return onConnectionsChange?.apply(this, args);
  };
  const onWidgetChanged = proto.onWidgetChanged;
  proto.onWidgetChanged = function (...args) {
    schedule();
    return onWidgetChanged?.apply(this, args);
  };
}

function specEntries(nodeData) {
  const out = [];
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[section] ?? {})) {
      out.push([name, Array.isArray(spec) ? spec[0] : spec]);
    }
  }
  return out;
}

// Samplers and guiders: take conditioning (or a guider) and have a cfg, a sampler_name or a SAMPLER.
function isGuidedNodeDef(nodeData) {
  const entries = specEntries(nodeData);
  const takesCond = entries.some(([, t]) => t === "CONDITIONING" || t === "GUIDER");
  const guides = entries.some(([n, t]) => n === "cfg" || n === "sampler_name" || t === "SAMPLER");
  return takesCond && guides;
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (isGuidedNodeDef(nodeData)) guardNodeType(nodeType);
  },
  async setup() {
    // Undo/redo, paste, bypass, workflow switches: the change tracker reports every graph change.
    api.addEventListener("graphChanged", schedule);
  },
  async afterConfigureGraph() {
    evaluateAll();
  },
  nodeCreated() {
    schedule();
  },
  // For tests and other extensions.
  diagnose,
  evaluateAll,
  fixNode,
  problemsOf: (node) => (state.get(node)?.problems ?? []).map((p) => ({ text: p.text, fixable: !!p.fix })),
});
