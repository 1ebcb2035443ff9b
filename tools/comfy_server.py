"""Run the real ComfyUI server with this pack loaded from the working tree (tests, demo, benchmarks).

The pack is linked into a private custom_nodes folder under its published folder name, handed to
ComfyUI through --extra-model-paths-config (as ComfyUI's own execution tests load their test pack);
--base-directory isolates models / input / output / user in a scratch folder."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from .comfy_env import COMFY_DIR, ROOT

PACK_FOLDER = "ComfyUI-cfg-distill"
PROBE_PACK = os.path.join(ROOT, "tools", "probe_nodes", "cfg_distill_probe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: str, with_probe: bool = True, port: int | None = None, extra_args=()):
        self.base_dir = os.path.abspath(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.with_probe = with_probe
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = os.path.join(self.base_dir, "comfyui.log")

    # -- lifecycle -----------------------------------------------------------------------------
    def _prepare_dirs(self) -> str:
        for sub in ("custom_nodes", "models/checkpoints", "models/dice_refiners", "input", "output", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        packs = os.path.join(self.base_dir, "packs")
        os.makedirs(packs, exist_ok=True)
        links = {PACK_FOLDER: ROOT}
        if self.with_probe:
            links["cfg_distill_probe"] = PROBE_PACK
        for name, target in links.items():
            link = os.path.join(packs, name)
            if os.path.islink(link) and os.readlink(link) != target:
                os.remove(link)
            if not os.path.exists(link):
                os.symlink(target, link)
        yaml_path = os.path.join(self.base_dir, "extra_model_paths.yaml")
        with open(yaml_path, "w") as f:
            f.write(f"cfg_distill_dev:\n    custom_nodes: {packs}\n")
        return yaml_path

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        yaml_path = self._prepare_dirs()
        cmd = [sys.executable, os.path.join(COMFY_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", self.base_dir,
               "--extra-model-paths-config", yaml_path, "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP ----------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_status(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, payload) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, api_prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": api_prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                return hist[prompt_id]
            if not self.alive():
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, api_prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(api_prompt), timeout)


class PromptRejected(RuntimeError):
    def __init__(self, body):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


def succeeded(entry: dict) -> bool:
    return entry.get("status", {}).get("status_str") == "success"


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
