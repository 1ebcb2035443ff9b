"""Screenshots of the example workflows in the real ComfyUI frontend (headless Debian chromium).

    .venv/bin/python tools/screenshot_workflows.py            # writes docs/screenshots/*.png

Also the browser layer of tests/test_browser.py (same launch, settings and graph helpers), so the
README pictures and the tested UI are the same code path. Needs `chromium` (apt) and the Python
`playwright` package; playwright's own browser download is never used.

The README shots use a scratch ComfyUI base folder: the example workflows' checkpoint names are
shown as saved (no checkpoint is loaded), and placeholder refiners with the workflows' file names
carry illustrative metadata so the loader's details panel has something to show."""
from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CHROMIUM = os.environ.get("CFG_DISTILL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
EXTENSIONS = ("cfg_distill.cfg_guard", "cfg_distill.training_view", "cfg_distill.refiner_info")
DOCS_DIR = os.path.join(ROOT, "docs", "screenshots")
WORKFLOWS_DIR = os.path.join(ROOT, "example_workflows")
# First-run UI that would cover the canvas (template browser, minimap); stored server-side.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                  "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Graph.CanvasInfo": False,
                  "Comfy.Graph.CanvasMenu": False}
DOCS_SIZE = (1400, 840)  # downsampled from a 2000x1200 page; palette PNGs stay well under 200 KB


class BrowserMissing(RuntimeError):
    pass


def require_browser() -> None:
    """Fail loudly (never skip) when the browser stack is absent: CI installs it."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise BrowserMissing(
            f"Debian chromium not found at {CHROMIUM}. Install it with `apt-get install -y chromium` "
            "(or `WITH_BROWSER=1 bash tools/setup_env.sh`); set CFG_DISTILL_CHROMIUM for another path.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise BrowserMissing("Python playwright is missing: `.venv/bin/pip install -r tools/test-requirements.txt` "
                             "(never run `playwright install`: the system chromium is used)") from None


class Frontend:
    """One headless chromium page on a running ComfyServer's frontend."""

    def __init__(self, server, viewport=(1600, 1000), init_scripts=()):
        self.server = server
        self.viewport = viewport
        self.init_scripts = list(init_scripts)  # run in the page before any of its own scripts
        self.console: list[str] = []
        self.console_entries: list[tuple[str, str, str]] = []  # (type, text, source url)
        self.errors: list[str] = []
        self.last_ws_frame = time.monotonic()  # the page's websocket: a sign of server activity

    def __enter__(self) -> "Frontend":
        require_browser()
        from playwright.sync_api import sync_playwright

        status, body = self.server.post("/settings", QUIET_SETTINGS)
        if status != 200:
            raise RuntimeError(f"could not store frontend settings: {status} {body}")
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            self.context = self.browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            # The "Nodes 2.0" banner remembers its dismissal in localStorage.
            self.context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            for script in self.init_scripts:
                self.context.add_init_script(script)
            self.page = self.context.new_page()
            self.page.on("console", self._on_console)
            self.page.on("websocket", lambda ws: ws.on("framereceived", self._on_frame))
            self.page.on("pageerror", lambda e: self.errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
            self.page.goto(self.server.url + "/", wait_until="domcontentloaded")
            try:
                self.page.wait_for_function(
                    "names => !!(window.app && app.graph && app.canvas && window.LiteGraph && "
                    "names.every(n => app.extensions.some(e => e.name === n)))", arg=list(EXTENSIONS),
                    timeout=180_000)  # a loaded machine: the bundle alone takes a while to parse
            except Exception as e:
                raise RuntimeError(f"the frontend did not start with our extensions ({e}); page errors: "
                                   f"{self.errors}; console: {self.console[-20:]}") from None
            self.page.wait_for_timeout(500)  # let the first-run UI settle before we drive the graph
        except BaseException:
            self.close()
            raise
        return self

    def _on_console(self, m) -> None:
        self.console.append(f"{m.type}: {m.text}")
        self.console_entries.append((m.type, m.text, (m.location or {}).get("url", "")))

    def _on_frame(self, _frame) -> None:
        self.last_ws_frame = time.monotonic()

    def last_activity(self) -> float:
        """time.monotonic() of the last websocket message the page received (events are delivered
        while playwright runs, so let it run briefly first)."""
        self.page.wait_for_timeout(1)
        return self.last_ws_frame

    def close(self) -> None:
        if getattr(self, "browser", None) is not None:
            try:
                self.browser.close()
            except Exception:  # already gone (crashed browser): nothing left to close
                pass
            self.browser = None
        if getattr(self, "_pw", None) is not None:
            self._pw.stop()
            self._pw = None

    def __exit__(self, *exc) -> None:
        self.close()

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def load_workflow(self, workflow: dict) -> None:
        self.js("async wf => { await app.loadGraphData(wf); }", workflow)
        self.page.wait_for_timeout(300)

    def fit_view(self, margin: int = 60, max_scale: float = 1.0) -> None:
        """Zoom and pan so that every node (and our warning badges above them) is on screen."""
        self.js("""([margin, maxScale]) => {
            const nodes = app.graph.nodes;
            if (!nodes.length) return;
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of nodes) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 34);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            const canvas = app.canvas.canvas;
            const rect = canvas.getBoundingClientRect();
            const scale = Math.min(maxScale, (rect.width - 2 * margin) / (x1 - x0),
                                   (rect.height - 2 * margin) / (y1 - y0));
            const ds = app.canvas.ds;
            ds.scale = scale;
            ds.offset[0] = (rect.width / scale - (x1 - x0)) / 2 - x0;
            ds.offset[1] = (rect.height / scale - (y1 - y0)) / 2 - y0;
            app.canvas.setDirty(true, true);
        }""", [margin, max_scale])
        self.page.wait_for_timeout(300)

    def client_point(self, graph_xy) -> tuple[float, float]:
        """Page coordinates of a point in graph space (for real mouse clicks)."""
        return tuple(self.js("""([x, y]) => {
            const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]);
            const r = app.canvas.canvas.getBoundingClientRect();
            return [r.left + cx, r.top + cy];
        }""", list(graph_xy)))

    def set_focus_mode(self, on: bool) -> None:
        """Hide the menus and side bars (clean pictures); the canvas and DOM widgets stay."""
        self.js("on => { app.extensionManager.focusMode = on; }", on)
        self.page.wait_for_timeout(400)

    def screenshot(self, path: str, size: tuple[int, int] | None = None, palette: bool = False) -> str:
        """PNG of the page; `size` downsamples (and `palette` quantizes) for small committed images."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.js("() => app.canvas.draw(true, true)")
        self.page.wait_for_timeout(150)
        png = self.page.screenshot()
        if size is None and not palette:
            with open(path, "wb") as f:
                f.write(png)
            return path
        from PIL import Image

        img = Image.open(io.BytesIO(png)).convert("RGB")
        if size:
            img = img.resize(size, Image.LANCZOS)
        if palette:
            # Octree keeps small saturated accents (the guard's red and green) that median cut merges away.
            img = img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        img.save(path, optimize=True)
        return path


# -- docs screenshots -------------------------------------------------------------------------------
PLACEHOLDER_FAMILIES = [("xl", 2048, "sdxl"), ("sd3", 4096, "sd3"), ("wan", 4096, "wan"),
                        ("qwen", 3584, "qwen_image")]


def _placeholder_refiners(folder: str, workflows: dict[str, dict]) -> None:
    """Random-weight refiners under the file names the example workflows use (display only)."""
    import torch

    from cfg_distill import DiceRefiner, RefinerInfo, save_refiner

    for wf in workflows.values():
        nodes = {n["type"]: n for n in wf["nodes"]}
        loader, ckpt = nodes.get("DiceRefinerLoader"), nodes.get("CheckpointLoaderSimple")
        if not loader:
            continue
        name = loader["widgets_values"][0]
        # the family from the file name, so that the loader's details panel shows the right one
        dim, family = next(((d, f) for key, d, f in PLACEHOLDER_FAMILIES if key in name.lower()), (768, "sd15"))
        torch.manual_seed(0)
        info = RefinerInfo(dim, 512, base_family=family,
                           base_checkpoint=ckpt["widgets_values"][0] if ckpt else "", guidance_scale=5.0)
        save_refiner(os.path.join(folder, name), DiceRefiner(info.token_dim, info.inner_dim), info)


def load_example_workflows() -> dict[str, dict]:
    import json

    out = {}
    for name in sorted(os.listdir(WORKFLOWS_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(WORKFLOWS_DIR, name)) as f:
                out[name] = json.load(f)
    return out


def main() -> int:
    from tools.comfy_server import ComfyServer

    require_browser()
    workflows = load_example_workflows()
    base = tempfile.mkdtemp(prefix="cfgd-shots-")
    t0 = time.time()
    try:
        refiners = os.path.join(base, "models", "dice_refiners")
        os.makedirs(refiners)
        _placeholder_refiners(refiners, workflows)
        os.makedirs(DOCS_DIR, exist_ok=True)
        with ComfyServer(base, with_probe=False) as server, Frontend(server, viewport=(2000, 1200)) as fe:
            fe.set_focus_mode(True)
            for name, wf in workflows.items():
                fe.load_workflow(wf)
                fe.fit_view()
                path = os.path.join(DOCS_DIR, name.replace(".json", ".png"))
                fe.screenshot(path, size=DOCS_SIZE, palette=True)
                print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KB)")
            # The cfg guard at work: the DICE example with cfg 5.
            fe.load_workflow(workflows["dice_sd15.json"])
            fe.js("""() => { const ks = app.graph.nodes.find(n => n.type === 'KSampler');
                             ks.widgets.find(w => w.name === 'cfg').setValue(5, {node: ks, canvas: app.canvas}); }""")
            fe.page.wait_for_timeout(200)
            fe.fit_view()
            path = fe.screenshot(os.path.join(DOCS_DIR, "cfg_guard.png"), size=DOCS_SIZE, palette=True)
            print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KB)")
            if fe.errors:
                print("page errors:", *fe.errors, sep="\n  ")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
