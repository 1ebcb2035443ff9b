// Refiner details on "Load DICE Refiner": a refiner belongs to one base model family, and an SDXL
// refiner on an SD1.5 checkpoint only fails at queue time. Showing the file's metadata (read by the
// pack's read-only route GET /cfg_distill/refiner_info) lets the user check before queueing.
import { app } from "../../../scripts/app.js"; // served at /extensions/<pack>/js/
import { api } from "../../../scripts/api.js";

export const EXTENSION = "cfg_distill.refiner_info";
const LOADER = "DiceRefinerLoader";
const views = new WeakMap(); // node -> { root, requested }

const STYLE = `
.cfgd-refiner { font: 12px sans-serif; color: var(--input-text, #ddd); padding: 2px 6px;
  line-height: 1.45; box-sizing: border-box; overflow: hidden; }
.cfgd-refiner .cfgd-family { font-weight: bold; color: #90caf9; }
.cfgd-refiner .cfgd-muted { color: #999; }
.cfgd-refiner .cfgd-error { color: #ef9a9a; white-space: normal; }
.cfgd-refiner div { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`;

function injectStyle() {
  if (document.getElementById("cfgd-refiner-style")) return;
  const el = document.createElement("style");
  el.id = "cfgd-refiner-style";
  el.textContent = STYLE;
  document.head.append(el);
}

export async function fetchInfo(name) {
  const res = await api.fetchApi(`/cfg_distill/refiner_info?name=${encodeURIComponent(name)}`);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = { error: `HTTP ${res.status}` };
  }
  return { ok: res.ok, status: res.status, body };
}

function line(root, text, cls = "") {
  const d = document.createElement("div");
  d.textContent = text;
  if (cls) d.className = cls;
  root.append(d);
  return d;
}

function render(root, name, { ok, body }) {
  root.replaceChildren();
  root.dataset.name = name;
  if (!ok) {
    root.dataset.state = "error";
    line(root, `⚠ ${body?.error ?? "no details"}`, "cfgd-error");
    return;
  }
  root.dataset.state = "ok";
  root.dataset.family = body.base_family;
  root.dataset.tokenDim = body.token_dim;
  line(root, `${body.family_label} refiner · ${body.token_dim}-d tokens`, "cfgd-family");
  if (!body.has_metadata) {
    line(root, "no cfg-distill metadata (family inferred from the weights only)", "cfgd-muted");
    return;
  }
  const trained = [];
  if (body.guidance_scale != null) trained.push(`trained at guidance ${body.guidance_scale}`);
  if (body.train_steps != null) trained.push(`${body.train_steps} steps`);
  if (trained.length) line(root, trained.join(" · "));
  if (body.base_checkpoint) {
    line(root, `base: ${body.base_checkpoint}${body.base_hash ? ` [${body.base_hash}]` : ""}`, "cfgd-muted");
  }
}

function ensureView(node) {
  let view = views.get(node);
  if (view) return view;
  injectStyle();
  const root = document.createElement("div");
  root.className = "cfgd-refiner";
  root.dataset.state = "empty";
  const widget = node.addDOMWidget("cfg_distill_refiner_info", "cfg_distill_info", root, {
    serialize: false, // display only: not a widget value of the node
    hideOnZoom: false,
    getMinHeight: () => 62,
    getMaxHeight: () => 90,
  });
  widget.serialize = false;
  view = { root, widget, requested: null };
  views.set(node, view);
  fit(node);
  return view;
}

// Grow (never shrink) the node so the details fit: saved workflows restore their old, smaller size.
function fit(node) {
  const [w, h] = node.size;
  const min = node.computeSize?.() ?? [w, h];
  if (w < 320 || h < min[1]) node.setSize([Math.max(w, 320), Math.max(h, min[1])]);
}

async function refresh(node) {
  const view = ensureView(node);
  const name = node.widgets?.find((w) => w.name === "refiner_name")?.value;
  if (!name) {
    view.root.replaceChildren();
    line(view.root, "no refiner selected: put .safetensors refiners in models/dice_refiners", "cfgd-muted");
    view.root.dataset.state = "empty";
    return;
  }
  if (view.requested === name) return;
  view.requested = name;
  view.root.dataset.state = "loading";
  let result;
  try {
    result = await fetchInfo(name);
  } catch (e) {
    result = { ok: false, status: 0, body: { error: `could not reach the server: ${e}` } };
  }
  if (view.requested !== name) return; // the selection changed while we waited
  render(view.root, name, result);
  fit(node);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== LOADER) return;
    const proto = nodeType.prototype;
    // Loading a saved workflow sets widget values without callbacks: refresh after configure too.
    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (...args) {
      const r = onConfigure?.apply(this, args);
      queueMicrotask(() => refresh(this));
      return r;
    };
    const onWidgetChanged = proto.onWidgetChanged;
    proto.onWidgetChanged = function (name, ...rest) {
      if (name === "refiner_name") refresh(this);
      return onWidgetChanged?.call(this, name, ...rest);
    };
  },
  nodeCreated(node) {
    if ((node.comfyClass ?? node.type) !== LOADER) return;
    ensureView(node);
    const w = node.widgets?.find((x) => x.name === "refiner_name");
    if (w) {
      // Combo picks from the menu run the callback; keep whatever callback the frontend set.
      const callback = w.callback;
      w.callback = function (...args) {
        const r = callback?.apply(this, args);
        refresh(node);
        return r;
      };
    }
    queueMicrotask(() => refresh(node));
  },
  fetchInfo,
  refresh,
});
