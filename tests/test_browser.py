"""The pack's frontend in the real ComfyUI frontend, in headless Debian chromium (no mocks).

The real ComfyUI server (tools/comfy_server.py) serves the real comfyui-frontend-package with our
web/ extension; Python playwright drives /usr/bin/chromium. A missing browser FAILS these tests
(tools/screenshot_workflows.require_browser says how to install it); nothing is skipped.
Screenshots land in test-artifacts/screenshots/ (gitignored)."""
import os
import time
import urllib.parse

import pytest

from tools.comfy_env import comfyui_version, frontend_version
from tools.comfy_server import IDLE_TIMEOUT, execution_error, succeeded
from tools.screenshot_workflows import EXTENSIONS, BrowserMissing, Frontend, require_browser

from comfy_fixtures import CKPT, EXAMPLE_FILES, SAMPLERS, STAND_IN_LOADER, load_workflow

pytestmark = pytest.mark.browser
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = os.path.join(ROOT, "test-artifacts", "screenshots")
WORKFLOWS = sorted(n for n in os.listdir(os.path.join(ROOT, "example_workflows")) if n.endswith(".json"))
OUR_NODES = ("DiceRefinerLoader", "DiceRefinerApply", "TeEFusionConditioning")

# -- the browser console ------------------------------------------------------------------------------
# The pack's own code must print no warnings or errors, in any tested frontend. Warnings that the
# frontend prints ABOUT our code count too (e.g. a deprecated API we read: the frontend's
# console.warn runs inside our call), so every console.warn / console.error is recorded with the
# JS stack it was called from; a message is ours when that stack, its text or its source URL names
# the pack. Installed before the page's own scripts, so the frontend's loggers keep this wrapper.
OUR_URL = "/extensions/ComfyUI-cfg-distill/"
OUR_MARKERS = (OUR_URL, "cfg_distill", "cfg-distill")
CONSOLE_TAP_JS = """(() => {
  const seen = [];
  Object.defineProperty(window, '__cfgdConsole', { value: seen });
  const text = (args) => args.map((a) => (a instanceof Error ? `${a.message}\n${a.stack}` : String(a))).join(' ');
  for (const level of ['warn', 'error']) {
    const original = console[level];
    console[level] = function (...args) {
      const limit = Error.stackTraceLimit;
      Error.stackTraceLimit = 200;
      const stack = new Error().stack;
      Error.stackTraceLimit = limit;
      seen.push({ level, text: text(args), stack });
      return original.apply(this, args);
    };
  }
  window.addEventListener('error', (e) => seen.push({ level: 'pageerror', text: String(e.message),
    stack: `${e.error?.stack ?? ''}\n${e.filename ?? ''}` }));
  window.addEventListener('unhandledrejection', (e) => seen.push({ level: 'unhandledrejection',
    text: String(e.reason?.message ?? e.reason), stack: String(e.reason?.stack ?? '') }));
})();"""


# The browser itself logs every non-2xx answer ("Failed to load resource"). Our refiner details
# route answers 404 / 422 for missing or damaged files on purpose, and the panel shows that answer:
# handled, not printed by our code. A failed load of the pack's own JS still counts.
HANDLED_ROUTE = "/cfg_distill/refiner_info?"


def _ours(*texts) -> bool:
    return any(m in (t or "") for t in texts for m in OUR_MARKERS)


def our_console_problems(fe) -> list[str]:
    """Warnings and errors of the pack's own code seen so far (the tap, the browser's own console
    messages such as failed loads of our files, and uncaught page errors)."""
    tapped = fe.js("() => window.__cfgdConsole.map(m => [m.level, m.text, m.stack])")
    found = [f"{level}: {text}\n{stack}" for level, text, stack in tapped if _ours(text, stack)]
    found += [f"{kind}: {text} ({url})" for kind, text, url in fe.console_entries
              if kind in ("warning", "error") and _ours(text, url)
              and not (text.startswith("Failed to load resource") and HANDLED_ROUTE in url)]
    found += [e for e in fe.errors if _ours(e)]
    return found


# -- JS helpers (run in the page) -------------------------------------------------------------------
# Point a loaded example workflow at the test files and make it small, through the widgets' own
# setValue (what a user edit runs: callbacks fire, so the refiner details refresh).
SHRINK_JS = """([f, size, steps]) => {
  const set = (node, name, value) => {
    const w = node.widgets.find(w => w.name === name);
    w.setValue(value, {node, canvas: app.canvas});
  };
  for (const n of app.graph.nodes) {
    if (n.type === 'CheckpointLoaderSimple') set(n, 'ckpt_name', f.ckpt);
    if (n.type === 'UNETLoader') {  // one file, or one per original name (Wan 2.2's two experts)
      const unet = n.widgets.find(w => w.name === 'unet_name').value;
      set(n, 'unet_name', typeof f.unet === 'object' ? f.unet[unet] : f.unet);
    }
    if (n.type === 'VAELoader') set(n, 'vae_name', f.vae);
    if (n.type === 'DiceRefinerLoader') set(n, 'refiner_name', f.refiner);
    if (['EmptyLatentImage', 'EmptySD3LatentImage', 'EmptyHunyuanLatentVideo'].includes(n.type)) {
      set(n, 'width', size); set(n, 'height', size);
      if (n.type === 'EmptyHunyuanLatentVideo') set(n, 'length', f.length ?? 1);
    }
    if (n.type === 'KSampler') set(n, 'steps', steps);
    if (n.type === 'KSamplerAdvanced') {  // keep where the steps are split (Wan 2.2: high / low noise)
      const get = (name) => n.widgets.find(w => w.name === name).value;
      const old = get('steps'), start = get('start_at_step'), end = get('end_at_step');
      set(n, 'steps', steps);
      set(n, 'start_at_step', Math.min(Math.round(start * steps / old), steps));
      if (end <= old) set(n, 'end_at_step', Math.min(Math.round(end * steps / old), steps));
    }
  }
}"""
GUARD = "() => app.extensions.find(e => e.name === 'cfg_distill.cfg_guard')"
PROBLEMS_JS = """id => app.extensions.find(e => e.name === 'cfg_distill.cfg_guard')
  .problemsOf(app.graph.getNodeById(id))"""
SET_WIDGET_JS = """([id, name, value]) => {
  const node = app.graph.getNodeById(id);
  node.widgets.find(w => w.name === name).setValue(value, {node, canvas: app.canvas});
}"""
WIDGET_JS = "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value"
ADD_NODE_JS = """([type, pos, values]) => {
  const node = LiteGraph.createNode(type);
  node.pos = pos;
  app.graph.add(node);
  for (const [name, value] of Object.entries(values || {})) node.widgets.find(w => w.name === name).value = value;
  return node.id;
}"""
# Connect output `slot` of node a to input `name` (or index) of node b (what a drag on the canvas does).
CONNECT_JS = """([a, slot, b, name]) => {
  const src = app.graph.getNodeById(a), dst = app.graph.getNodeById(b);
  const i = typeof name === 'number' ? name : dst.inputs.findIndex(x => x.name === name);
  if (i < 0) throw new Error(`no input ${name} on ${dst.type}`);
  src.connect(slot, dst, i);
}"""


@pytest.fixture(scope="session")  # session scope: checked before the (session) server starts
def browser_ready():
    try:
        require_browser()
    except BrowserMissing as e:  # a failure, not a skip: CI installs the browser
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def fe(browser_ready, server, family_models):  # browser check first: no server start when it is missing
    with Frontend(server, init_scripts=[CONSOLE_TAP_JS]) as frontend:
        # Frontends that warn about deprecated APIs do so once per message; repeat them, so that
        # our use is reported even when something else used the same API first.
        frontend.js("() => { if (LiteGraph && 'alwaysRepeatWarnings' in LiteGraph) LiteGraph.alwaysRepeatWarnings = true; }")
        yield frontend
        problems = our_console_problems(frontend)
    assert not problems, "the pack's code printed warnings or errors in the browser console:\n" + "\n".join(problems)


def node_id(fe, type_):
    return fe.js("t => app.graph.nodes.find(n => n.type === t).id", type_)


def toggle_bypass(fe, nid):
    fe.js("id => app.canvas.selectNode(app.graph.getNodeById(id))", nid)
    fe.page.keyboard.press("Control+b")
    fe.js("() => app.canvas.deselectAll()")


def wait_problems(fe, nid, predicate, timeout=20.0):
    """Re-evaluation is driven by the graph's own change hooks: poll until the state settles."""
    deadline = time.time() + timeout
    while True:
        problems = fe.js(PROBLEMS_JS, nid)
        if predicate(problems) or time.time() > deadline:
            return problems
        fe.page.wait_for_timeout(50)


def wait_prompt(fe, server, prompt_id) -> dict:
    """Progress-aware: the frontend's own websocket (its prompt's progress) counts as a sign of life."""
    return server.wait(prompt_id, activity=(fe.last_activity,))


def queue_from_frontend(fe, stand_in=False) -> tuple[str, dict]:
    """app.graphToPrompt (the frontend's own converter), queued with the frontend's api client.
    stand_in: after the conversion, swap each stock CLIPLoader for the test-only stand-in loader
    (tests/stand_in_nodes; comfy_fixtures.stand_in_text_encoders says why), as the server tests do."""
    res = fe.js("""async ([standIn, loader]) => {
        const p = await app.graphToPrompt();
        const original = JSON.parse(JSON.stringify(p.output));
        for (const node of Object.values(p.output)) {
            if (standIn && node.class_type === 'CLIPLoader') {
                node.class_type = loader;
                node.inputs = {clip_name: node.inputs.clip_name, type: node.inputs.type};
            }
        }
        const r = await window.comfyAPI.api.api.queuePrompt(0, p);
        return {prompt_id: r.prompt_id, output: original};
    }""", [stand_in, STAND_IN_LOADER])
    return res["prompt_id"], res["output"]


def load_test_workflow(fe, name, refiner=None):
    """Load an example workflow and point it at the test files (comfy_fixtures.EXAMPLE_FILES)."""
    fe.load_workflow(load_workflow(name))
    files = {"ckpt": CKPT, "refiner": "sd15-random.safetensors", **EXAMPLE_FILES.get(name, {})}
    if refiner:
        files["refiner"] = refiner
    fe.js(SHRINK_JS, [files, 64, 3])


# -- registration -------------------------------------------------------------------------------
def test_runs_the_selected_comfyui_and_frontend(fe, server):
    """The version matrix is real: the server and the page are the tree and frontend selected
    (tools/test.sh sets CFG_DISTILL_EXPECT_* for each run of the matrix)."""
    served = server.get("/system_stats")["system"]["comfyui_version"]
    page = fe.js("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert served == comfyui_version() and page == frontend_version(), (served, page)
    assert served == os.environ.get("CFG_DISTILL_EXPECT_COMFYUI", served)
    assert page == os.environ.get("CFG_DISTILL_EXPECT_FRONTEND", page)


def test_console_check_sees_a_warning_from_our_code(fe):
    """The console check is real: make the cfg guard's own console.warn fire (a node whose check
    throws) and see it reported; then drop exactly that message."""
    load_test_workflow(fe, "dice_sd15.json")
    token = f"console-check-{time.time_ns()}"
    fe.js("""token => {
        const ks = app.graph.nodes.find(n => n.type === 'KSampler');
        const own = Object.getOwnPropertyDescriptor(ks, 'inputs');
        Object.defineProperty(ks, 'inputs', { configurable: true, get() { throw new Error(token); } });
        try { app.extensions.find(e => e.name === 'cfg_distill.cfg_guard').evaluateAll(); }
        finally { if (own) Object.defineProperty(ks, 'inputs', own); else delete ks.inputs; }
    }""", token)
    problems = our_console_problems(fe)
    assert any(token in p and "cfg_guard.js" in p for p in problems), problems
    fe.js("t => { const c = window.__cfgdConsole; for (let i = c.length - 1; i >= 0; i--) "
          "if (c[i].text.includes(t) || c[i].stack.includes(t)) c.splice(i, 1); }", token)
    fe.console_entries[:] = [e for e in fe.console_entries if token not in e[1]]
    assert not [p for p in our_console_problems(fe) if token in p]
    fe.js("() => app.graph.clear()")


def test_extension_and_node_types_registered(fe):
    names = fe.js("() => app.extensions.map(e => e.name)")
    assert set(EXTENSIONS) <= set(names)
    registered = fe.js("types => types.filter(t => t in LiteGraph.registered_node_types)", list(OUR_NODES))
    assert registered == list(OUR_NODES)
    # Served from the pack's web/ folder under its published folder name (the list the frontend loads).
    scripts = fe.js("async () => (await (await fetch('/extensions')).json())"
                    ".filter(n => n.startsWith('/extensions/ComfyUI-cfg-distill/'))")
    assert {s.rsplit("/", 1)[1] for s in scripts} == {"cfg_guard.js", "training_view.js", "refiner_info.js"}


# -- example workflows through the real frontend ------------------------------------------------------
@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflow_loads_converts_queues_and_succeeds(fe, server, name):
    """Every example workflow through the real frontend, on the tiny models the server tests use.
    The Wan and Qwen-Image workflows' CLIPLoader is swapped for the test-only stand-in after the
    frontend's conversion (their real text encoders cannot run here); every other node is stock.
    Every sampler (Wan 2.2 has two KSamplerAdvanced) is at cfg 1 and passes the cfg guard."""
    load_test_workflow(fe, name)
    types = fe.js("() => app.graph.nodes.map(n => n.type)")
    assert "Note" in types, "each example workflow keeps its cfg 1 note"
    note = fe.js("() => app.graph.nodes.find(n => n.type === 'Note').widgets[0].value")
    assert "cfg" in note and "1.0" in note
    samplers = fe.js("types => app.graph.nodes.filter(n => types.includes(n.type)).map(n => n.id)", list(SAMPLERS))
    for ks in samplers:
        assert fe.js(WIDGET_JS, [ks, "cfg"]) == 1.0
        assert wait_problems(fe, ks, lambda p: p == [], 1.0) == []  # the examples are correct: no warning
    stand_in = EXAMPLE_FILES.get(name, {}).get("stand_in", False)
    prompt_id, output = queue_from_frontend(fe, stand_in=stand_in)
    classes = {v["class_type"] for v in output.values()}
    assert classes & set(SAMPLERS) and "Note" not in classes
    assert classes & {"CheckpointLoaderSimple", "UNETLoader"} and classes & {"SaveImage", "SaveAnimatedWEBP"}
    assert classes & {*OUR_NODES, "TeEFusionModelPatch"}
    assert ("CLIPLoader" in classes) == stand_in  # the stock loader, as saved; swapped only when queued
    sampler_inputs = [v["inputs"] for v in output.values() if v["class_type"] in SAMPLERS]
    assert len(sampler_inputs) == len(samplers)
    assert all(k["cfg"] == 1.0 and k["steps"] == 3 for k in sampler_inputs)
    sampler = sampler_inputs[0]
    if "TeEFusionModelPatch" in classes:  # the sampler samples the patched model
        assert output[sampler["model"][0]]["class_type"] == "TeEFusionModelPatch"
    entry = wait_prompt(fe, server, prompt_id)
    assert succeeded(entry), execution_error(entry)
    # The frontend received the result too: the save node's preview is on the node (the canvas loads
    # previews of nodes it draws: fit the view first, Wan 2.2's graph is wider than the page).
    fe.fit_view()
    fe.page.wait_for_function("() => app.graph.nodes.some(n => ['SaveImage', 'SaveAnimatedWEBP'].includes(n.type)"
                              " && n.imgs?.length)", timeout=60_000)
    fe.screenshot(os.path.join(SHOTS, name.replace(".json", ".png")))


# -- the cfg guard ------------------------------------------------------------------------------------
def _badge_is_drawn(fe, nid) -> bool:
    """Read back the canvas pixels where the warning badge sits (drawn, not only computed)."""
    from io import BytesIO

    from PIL import Image

    fe.js("() => app.canvas.draw(true, true)")
    gx, gy = fe.js("id => { const n = app.graph.getNodeById(id); "
                   "return [n.pos[0] + 4, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 26]; }", nid)
    x, y = fe.client_point((gx, gy))
    img = Image.open(BytesIO(fe.page.screenshot())).convert("RGB")
    r, g, b = img.getpixel((int(x), int(y)))
    return r > 150 and g < 80 and b < 80  # the badge's red (#b71c1c)


def _click_fix(fe, nid):
    """A real mouse click on the node's 'set cfg 1.0' title button."""
    area = fe.js("""id => { const n = app.graph.getNodeById(id);
        const b = n.title_buttons.find(b => b.name === 'cfg_distill_fix');
        if (!b) return null;
        const [x, y, w, h] = b._last_area;
        return [n.pos[0] + x + w / 2, n.pos[1] + y + h / 2]; }""",
                 nid)
    assert area, "the fix button is not on the node"
    x, y = fe.client_point(area)
    fe.page.mouse.click(x, y)


def test_cfg_guard_flags_cfg5_and_fixes_with_one_click(fe):
    load_test_workflow(fe, "dice_sd15.json")
    ks = node_id(fe, "KSampler")
    fe.fit_view()
    assert wait_problems(fe, ks, lambda p: p == []) == []
    fe.js(SET_WIDGET_JS, [ks, "cfg", 5.0])
    problems = wait_problems(fe, ks, bool)
    assert len(problems) == 1 and problems[0]["fixable"]
    assert "cfg 5.0" in problems[0]["text"] and "DICE" in problems[0]["text"]
    fe.fit_view()
    assert _badge_is_drawn(fe, ks)
    fe.screenshot(os.path.join(SHOTS, "cfg_guard_cfg5.png"))
    _click_fix(fe, ks)
    assert wait_problems(fe, ks, lambda p: p == []) == []
    assert fe.js(WIDGET_JS, [ks, "cfg"]) == 1.0
    assert not _badge_is_drawn(fe, ks)


def test_cfg_guard_flags_cfg_pp_sampler_and_fix_switches_it(fe):
    load_test_workflow(fe, "teefusion_sd15.json")
    ks = node_id(fe, "KSampler")
    fe.js(SET_WIDGET_JS, [ks, "sampler_name", "euler_cfg_pp"])
    problems = wait_problems(fe, ks, bool)
    assert len(problems) == 1 and "euler_cfg_pp" in problems[0]["text"] and problems[0]["fixable"]
    fe.fit_view()
    assert _badge_is_drawn(fe, ks)
    fe.screenshot(os.path.join(SHOTS, "cfg_guard_cfg_pp.png"))
    _click_fix(fe, ks)
    assert wait_problems(fe, ks, lambda p: p == []) == []
    assert fe.js(WIDGET_JS, [ks, "sampler_name"]) == "euler" and fe.js(WIDGET_JS, [ks, "cfg"]) == 1.0


def test_cfg_guard_quiet_for_plain_conditioning_and_cfg1(fe):
    load_test_workflow(fe, "dice_sd15.json")
    ks, apply_ = node_id(fe, "KSampler"), node_id(fe, "DiceRefinerApply")
    prompt = fe.js("() => app.graph.nodes.find(n => n.type === 'CLIPTextEncode' && n.title === 'Prompt').id")
    fe.js(SET_WIDGET_JS, [ks, "cfg", 7.5])
    assert wait_problems(fe, ks, bool)
    # Rewire the sampler to the plain CLIPTextEncode: an ordinary cfg 7.5 workflow, no warning.
    fe.js(CONNECT_JS, [prompt, 0, ks, "positive"])
    assert wait_problems(fe, ks, lambda p: p == []) == []
    # Back through DICE: warned again (links are watched, not only widgets).
    fe.js(CONNECT_JS, [apply_, 0, ks, "positive"])
    assert wait_problems(fe, ks, bool)
    # A bypassed DICE node passes the plain prompt through: no warning (Ctrl+B, as a user does it).
    toggle_bypass(fe, apply_)
    assert fe.js("id => app.graph.getNodeById(id).mode", apply_) == 4
    assert wait_problems(fe, ks, lambda p: p == []) == []
    toggle_bypass(fe, apply_)
    assert fe.js("id => app.graph.getNodeById(id).mode", apply_) == 0
    assert wait_problems(fe, ks, bool)
    fe.js(SET_WIDGET_JS, [ks, "cfg", 1.0])
    assert wait_problems(fe, ks, lambda p: p == []) == []


def test_cfg_guard_traces_reroutes_and_conditioning_nodes(fe):
    load_test_workflow(fe, "dice_sd15.json")
    ks, apply_ = node_id(fe, "KSampler"), node_id(fe, "DiceRefinerApply")
    prompt = fe.js("() => app.graph.nodes.find(n => n.type === 'CLIPTextEncode' && n.title === 'Prompt').id")
    fe.js(SET_WIDGET_JS, [ks, "cfg", 4.0])
    # DICE -> Reroute -> ConditioningSetTimestepRange -> ConditioningCombine(+ plain) -> KSampler
    rr = fe.js(ADD_NODE_JS, ["Reroute", [900, 500], {}])
    ts = fe.js(ADD_NODE_JS, ["ConditioningSetTimestepRange", [950, 560], {}])
    cc = fe.js(ADD_NODE_JS, ["ConditioningCombine", [1000, 650], {}])
    fe.js(CONNECT_JS, [apply_, 0, rr, 0])
    fe.js(CONNECT_JS, [rr, 0, ts, "conditioning"])
    fe.js(CONNECT_JS, [prompt, 0, cc, "conditioning_1"])
    fe.js(CONNECT_JS, [ts, 0, cc, "conditioning_2"])
    fe.js(CONNECT_JS, [cc, 0, ks, "positive"])
    problems = wait_problems(fe, ks, bool)
    assert problems and "cfg 4.0" in problems[0]["text"]
    # ControlNetApplyAdvanced keeps positive and negative apart: DICE on its positive taints only that output.
    neg = fe.js("() => app.graph.nodes.find(n => n.type === 'CLIPTextEncode' && n.title !== 'Prompt').id")
    cn = fe.js(ADD_NODE_JS, ["ControlNetApplyAdvanced", [1000, 850], {}])
    fe.js(CONNECT_JS, [cc, 0, cn, "positive"])
    fe.js(CONNECT_JS, [neg, 0, cn, "negative"])
    fe.js(CONNECT_JS, [cn, 1, ks, "positive"])  # the controlnet's negative output: plain
    fe.js(CONNECT_JS, [cn, 1, ks, "negative"])
    assert wait_problems(fe, ks, lambda p: p == []) == []
    fe.js(CONNECT_JS, [cn, 0, ks, "positive"])  # its positive output: DICE
    assert wait_problems(fe, ks, bool)
    # ConditioningZeroOut drops the prompt: the chain no longer carries DICE guidance.
    zo = fe.js(ADD_NODE_JS, ["ConditioningZeroOut", [1000, 750], {}])
    fe.js(CONNECT_JS, [ts, 0, zo, "conditioning"])
    fe.js(CONNECT_JS, [zo, 0, cc, "conditioning_2"])
    assert wait_problems(fe, ks, lambda p: p == []) == []


def test_cfg_guard_sampler_custom_with_ksampler_select_and_cfg_guider(fe):
    load_test_workflow(fe, "dice_sd15.json")
    apply_ = node_id(fe, "DiceRefinerApply")
    neg = fe.js("() => app.graph.nodes.find(n => n.type === 'CLIPTextEncode' && n.title !== 'Prompt').id")
    ckpt = node_id(fe, "CheckpointLoaderSimple")
    sc = fe.js(ADD_NODE_JS, ["SamplerCustom", [1200, 700], {}])
    sel = fe.js(ADD_NODE_JS, ["KSamplerSelect", [900, 800], {"sampler_name": "dpmpp_2m_cfg_pp"}])
    fe.js(CONNECT_JS, [ckpt, 0, sc, "model"])
    fe.js(CONNECT_JS, [apply_, 0, sc, "positive"])
    fe.js(CONNECT_JS, [neg, 0, sc, "negative"])
    fe.js(CONNECT_JS, [sel, 0, sc, "sampler"])
    fe.js(SET_WIDGET_JS, [sc, "cfg", 1.0])
    problems = wait_problems(fe, sc, bool)
    assert len(problems) == 1 and "dpmpp_2m_cfg_pp" in problems[0]["text"]
    fe.fit_view()
    _click_fix(fe, sc)
    assert wait_problems(fe, sc, lambda p: p == []) == []
    assert fe.js(WIDGET_JS, [sel, "sampler_name"]) == "dpmpp_2m"
    # CFGGuider (for SamplerCustomAdvanced) is a guider with a cfg: guarded the same way.
    guider = fe.js(ADD_NODE_JS, ["CFGGuider", [1200, 1000], {}])
    fe.js(CONNECT_JS, [ckpt, 0, guider, "model"])
    fe.js(CONNECT_JS, [apply_, 0, guider, "positive"])
    fe.js(CONNECT_JS, [neg, 0, guider, "negative"])
    fe.js(SET_WIDGET_JS, [guider, "cfg", 3.0])
    assert wait_problems(fe, guider, bool)
    # ...and SamplerCustomAdvanced sees the DICE conditioning through its GUIDER input.
    sca = fe.js(ADD_NODE_JS, ["SamplerCustomAdvanced", [1600, 1000], {}])
    fe.js(CONNECT_JS, [guider, 0, sca, "guider"])
    fe.js(SET_WIDGET_JS, [sel, "sampler_name", "euler_cfg_pp"])
    fe.js(CONNECT_JS, [sel, 0, sca, "sampler"])
    problems = wait_problems(fe, sca, bool)
    assert problems and "euler_cfg_pp" in problems[0]["text"]
    # BasicGuider has no cfg (always one pass): never guarded.
    assert not fe.js("() => !!LiteGraph.registered_node_types.BasicGuider.cfgDistillGuarded")


# -- refiner details on the loader ------------------------------------------------------------------
def test_loader_shows_refiner_metadata(fe):
    load_test_workflow(fe, "dice_sdxl.json")
    loader = node_id(fe, "DiceRefinerLoader")
    panel = fe.page.locator(".cfgd-refiner").first

    def shown(name):
        fe.js(SET_WIDGET_JS, [loader, "refiner_name", name])
        fe.page.wait_for_function("n => document.querySelector('.cfgd-refiner')?.dataset.name === n && "
                                  "['ok', 'error'].includes(document.querySelector('.cfgd-refiner').dataset.state)",
                                  arg=name, timeout=60_000)
        return panel.inner_text()

    text = shown("sdxl-random.safetensors")
    assert "SDXL refiner" in text and "2048-d" in text and "guidance 5" in text and "0 steps" in text
    assert panel.is_visible()
    fe.fit_view()
    fe.screenshot(os.path.join(SHOTS, "refiner_info_sdxl.png"))
    text = shown("sd15-random.safetensors")
    assert "SD1.5 refiner" in text and "768-d" in text
    text = shown("truncated.safetensors")
    assert "truncated" in text and fe.js("() => document.querySelector('.cfgd-refiner').dataset.state") == "error"
    # The details panel is display only: not saved in the workflow, not sent to the server.
    saved = fe.js("() => app.graph.serialize().nodes.find(n => n.type === 'DiceRefinerLoader').widgets_values")
    assert saved == ["truncated.safetensors"]
    sent = fe.js("async () => Object.values((await app.graphToPrompt()).output)"
                 ".find(n => n.class_type === 'DiceRefinerLoader').inputs")
    assert sent == {"refiner_name": "truncated.safetensors"}


# -- live training view ---------------------------------------------------------------------------------
TRAIN_SETTINGS = {  # a few real steps on the tiny checkpoint (the node's defaults train for hours)
    "steps": 6, "batch_size": 1, "width": 64, "height": 64, "x0_steps": 2, "save_every": 0,
    "resume": False, "refiner_name": "browser-test-refiner", "prompts": "a red fox\na lighthouse at dusk"}


def _watch_training(fe, server, nid, shot):
    """Queue the graph from the frontend and read the node's view while it runs."""
    fe.fit_view(max_scale=1.2)
    prompt_id, output = queue_from_frontend(fe)
    assert str(nid) in output
    view = fe.page.locator(".cfgd-train").first
    seen, losses = [], []
    last_change = time.monotonic()
    # Progress-aware: give up when neither the node nor the page's websocket moved for a while.
    while time.monotonic() - max(last_change, fe.last_activity(), server.last_sign_of_life()) < IDLE_TIMEOUT:
        # One read of the view's attributes and the text a user sees, so a step that lands between
        # two reads cannot mix two steps (fast trainers update every few tens of milliseconds).
        snap = fe.js("""() => { const v = document.querySelector('.cfgd-train');
            if (!v) return null;
            const s = v.querySelector('.cfgd-status');
            return {state: v.getAttribute('data-state'), step: v.getAttribute('data-step'),
                    loss: v.getAttribute('data-loss'), status: s ? s.innerText : ''}; }""")
        state = snap["state"] if snap else None
        # This run's steps only: a previous run's view says "done" until the first new event.
        step = snap["step"] if snap and (state == "running" or seen) else None
        if step is not None and (not seen or int(step) != seen[-1]):
            last_change = time.monotonic()
            seen.append(int(step))
            losses.append(float(snap["loss"]))
            status = snap["status"]
            assert f"step {step}/" in status and "loss" in status and "ETA" in status, status
            assert view.is_visible()
            if len(seen) == 3:
                fe.screenshot(os.path.join(SHOTS, f"{shot}_running.png"))
        if seen and state in ("done", "cancelled"):
            break
        fe.page.wait_for_timeout(50)
    entry = wait_prompt(fe, server, prompt_id)
    assert succeeded(entry), execution_error(entry)
    assert len(seen) >= 3 and seen == sorted(seen), f"steps seen on the node: {seen}"
    assert all(x == x and x > 0 for x in losses), losses  # finite loss values shown
    assert view.get_attribute("data-state") == "done"
    done = view.locator(".cfgd-done").inner_text()
    assert "final loss" in done and ".safetensors" in done
    assert fe.js("() => document.querySelector('.cfgd-train polyline').getAttribute('points')").count(",") >= 3
    fe.screenshot(os.path.join(SHOTS, f"{shot}_done.png"))
    return seen, done


def test_training_view_event_contract_with_probe_node(fe, server):
    """The probe node sends exactly the trainer's events from the server, without training."""
    fe.js("() => app.graph.clear()")
    nid = fe.js(ADD_NODE_JS, ["EmitFakeTrainingProgress", [100, 100],
                              {"steps": 6, "seconds_per_step": 0.4, "file": "browser-test.safetensors"}])
    seen, done = _watch_training(fe, server, nid, "training_view_probe")
    assert seen[-1] == 6 and "browser-test.safetensors" in done
    # A second run on the same node starts a fresh curve.
    seen, _ = _watch_training(fe, server, nid, "training_view_probe_rerun")
    assert seen[0] <= 2


def _add_trainer(fe, node_type, settings):
    """CheckpointLoaderSimple -> a training node, widgets set as a user would; returns its id."""
    return fe.js("""([ckpt, nodeType, settings]) => {
        const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
        const ck = add('CheckpointLoaderSimple', [0, 100]);
        ck.widgets.find(w => w.name === 'ckpt_name').value = ckpt;
        const tr = add(nodeType, [400, 0]);
        ck.connect(0, tr, tr.inputs.findIndex(i => i.name === 'model'));
        ck.connect(1, tr, tr.inputs.findIndex(i => i.name === 'clip'));
        for (const [name, value] of Object.entries(settings)) {
            const w = tr.widgets.find(w => w.name === name);
            if (w) w.value = value;
        }
        return tr.id;
    }""", [CKPT, node_type, settings])


def _assert_final_check(fe, steps):
    """The held-out progress check of the run's end is on the node: its text and its ratio."""
    check = fe.page.locator(".cfgd-train .cfgd-check").first.inner_text()
    assert f"held-out check at step {steps}/{steps}" in check and "% of the start's gap left" in check, check
    ratio = float(fe.js("() => document.querySelector('.cfgd-train').dataset.checkRatio"))
    assert 0 < ratio < 10 and f"{100 * ratio:.0f}%" in check, (ratio, check)


def test_training_view_with_real_train_dice_refiner(fe, server, object_info):
    assert "TrainDiceRefiner" in object_info, "the real training node is not registered on the server"
    fe.js("() => app.graph.clear()")
    nid = _add_trainer(fe, "TrainDiceRefiner", TRAIN_SETTINGS)
    # The view is on the training node from the start, before anything runs.
    assert "queue the workflow" in fe.page.locator(".cfgd-train .cfgd-status").first.inner_text()
    seen, done = _watch_training(fe, server, nid, "training_view_real")
    assert seen[-1] == TRAIN_SETTINGS["steps"]
    _assert_final_check(fe, seen[-1])
    assert "browser-test-refiner.safetensors" in done


def test_training_view_with_real_train_teefusion(fe, server, object_info):
    """Train TeEFusion shows the same live view (steps, loss, ETA, curve, saved file) as the DICE trainer."""
    assert "TrainTeEFusion" in object_info, "the TeEFusion training node is not registered on the server"
    settings = {k: v for k, v in TRAIN_SETTINGS.items() if k != "refiner_name"}
    settings.update(lora_name="browser-test-teefusion", rank=4, learning_rate=3e-4)
    fe.js("() => app.graph.clear()")
    nid = _add_trainer(fe, "TrainTeEFusion", settings)
    assert "queue the workflow" in fe.page.locator(".cfgd-train .cfgd-status").first.inner_text()
    seen, done = _watch_training(fe, server, nid, "training_view_teefusion")
    assert seen[-1] == settings["steps"]
    _assert_final_check(fe, seen[-1])
    assert "browser-test-teefusion.safetensors" in done


# -- the metadata route (read-only, listed names only) -------------------------------------------------
def _info(server, name=None, raw_query=None):
    query = raw_query if raw_query is not None else urllib.parse.urlencode({"name": name})
    status, body = server.get_status(f"/cfg_distill/refiner_info?{query}")
    import json

    return status, json.loads(body)


@pytest.mark.server
def test_route_returns_metadata_of_listed_refiners(server):
    status, body = _info(server, "sd15-random.safetensors")
    assert status == 200, body
    assert (body["base_family"], body["family_label"], body["token_dim"]) == ("sd15", "SD1.5", 768)
    assert body["guidance_scale"] == 5.0 and body["train_steps"] == 0 and body["has_metadata"] is True
    status, body = _info(server, "sdxl-random.safetensors")
    assert status == 200 and (body["base_family"], body["token_dim"]) == ("sdxl", 2048)
    status, body = _info(server, "truncated.safetensors")  # listed but damaged: explained, not read
    assert status == 422 and "truncated" in body["error"]


@pytest.mark.server
@pytest.mark.parametrize("name,expected", [
    ("../sd15-random.safetensors", 400),
    ("../checkpoints/" + CKPT, 400),
    ("..\\checkpoints\\" + CKPT, 400),
    ("/etc/passwd", 400),
    ("C:\\Windows\\win.ini", 400),
    ("sub/../../sd15-random.safetensors", 400),
    ("", 400),
    ("nope.safetensors", 404),
    (CKPT, 404),  # a real file, but in another model folder
])
def test_route_refuses_names_outside_the_refiner_list(server, name, expected):
    status, body = _info(server, name)
    assert status == expected and body["error"], body


@pytest.mark.server
def test_route_refuses_absolute_and_encoded_paths(server, comfy_base):
    absolute = os.path.join(str(comfy_base), "models", "dice_refiners", "sd15-random.safetensors")
    assert os.path.isfile(absolute)
    status, body = _info(server, absolute)
    assert status == 400 and "error" in body
    status, body = _info(server, raw_query="name=%2e%2e%2fsd15-random.safetensors")
    assert status == 400 and "error" in body
    status, body = _info(server, raw_query="")  # no name at all
    assert status == 400 and "error" in body
