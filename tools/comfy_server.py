"""Run the real ComfyUI server with this pack loaded from the working tree (tests, demo, benchmarks).

The pack is linked into a private custom_nodes folder under its published folder name, handed to
ComfyUI through --extra-model-paths-config (as ComfyUI's own execution tests load their test pack);
--base-directory isolates models / input / output / user in a scratch folder.

Waiting is progress-aware: the harness listens on the server's websocket as the client that queued
the prompt, and a prompt fails when NO message (progress, executing, executed, training events...)
arrives for `idle_timeout` seconds, not after a fixed total time. A loaded machine makes every step
slower but keeps the messages coming; a hang stops them."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

from .comfy_env import COMFY_DIR, FRONTEND_ROOT, ROOT

PACK_FOLDER = "ComfyUI-cfg-distill"
PROBE_PACK = os.path.join(ROOT, "tools", "probe_nodes", "cfg_distill_probe")
# Seconds without any sign of life before a prompt counts as hung. On a quiet 2-core machine the
# longest silent phase of a test prompt (loading the tiny checkpoint) is a few seconds.
IDLE_TIMEOUT = float(os.environ.get("CFG_DISTILL_IDLE_TIMEOUT", "300"))
# Backstop for a prompt that keeps talking but never ends (e.g. a loop that reports progress forever).
TOTAL_TIMEOUT = float(os.environ.get("CFG_DISTILL_PROMPT_TIMEOUT", "3600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class _SocketListener:
    """The harness's own websocket client: every message the server sends it is a sign of life."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.last = time.monotonic()
        self.messages = 0
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self._thread.start()

    async def _listen(self):
        import aiohttp  # a ComfyUI requirement: present in every venv that runs a ComfyUI server

        while not self._stop:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:
                        async for _ in ws:
                            self.messages += 1
                            self.last = time.monotonic()
                            if self._stop:
                                break
            except Exception:  # not up yet, or restarted: reconnect
                pass
            await asyncio.sleep(0.5)

    def stop(self):
        self._stop = True


class ComfyServer:
    def __init__(self, base_dir: str, with_probe: bool = True, port: int | None = None, extra_args=(),
                 threads: int | None = None, extra_packs: dict[str, str] | None = None):
        self.base_dir = os.path.abspath(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.with_probe = with_probe
        self.extra_packs = dict(extra_packs or {})  # folder name -> path: test-only node packs
        self.extra_args = list(extra_args)
        # None: torch's default (one thread per core). Tests pass a small fixed number: on a busy
        # machine, threads competing with other processes made sampling steps about 10x slower.
        self.threads = threads
        self.proc = None
        self.log_path = os.path.join(self.base_dir, "comfyui.log")
        self.client_id = uuid.uuid4().hex  # the client this harness queues as and listens for
        self._listener = None

    # -- lifecycle -----------------------------------------------------------------------------
    def _prepare_dirs(self) -> str:
        for sub in ("custom_nodes", "models/checkpoints", "models/dice_refiners", "input", "output", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        packs = os.path.join(self.base_dir, "packs")
        os.makedirs(packs, exist_ok=True)
        links = {PACK_FOLDER: ROOT}
        if self.with_probe:
            links["cfg_distill_probe"] = PROBE_PACK
        links.update(self.extra_packs)
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

    def start(self, idle_timeout: float = 120.0, timeout: float = 900.0) -> "ComfyServer":
        """Start and wait until it answers. Start-up (imports, node loading) prints little, so a
        sign of life here is CPU time used or log lines written; `idle_timeout` seconds of neither
        is a hang, `timeout` the overall limit."""
        yaml_path = self._prepare_dirs()
        cmd = [sys.executable, os.path.join(COMFY_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", self.base_dir,
               "--extra-model-paths-config", yaml_path, "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        if FRONTEND_ROOT:
            cmd += ["--front-end-root", FRONTEND_ROOT]
        env = dict(os.environ)
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        t0 = last = time.monotonic()
        seen = (0.0, 0)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            now = time.monotonic()
            life = (_cpu_seconds(self.proc.pid), os.path.getsize(self.log_path))
            if life != seen:
                seen, last = life, now
            if now - last > idle_timeout or now - t0 > timeout:
                self.stop()
                why = f"no CPU use or log output for {idle_timeout:.0f}s" if now - last > idle_timeout \
                    else f"not up after {timeout:.0f}s"
                raise RuntimeError(f"ComfyUI did not start ({why}); see {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.3)
        self._listener = _SocketListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
        return self

    def stop(self) -> None:
        if self._listener:
            self._listener.stop()
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
        """Queue as this harness's client, so that the prompt's progress messages reach our listener."""
        status, body = self.post("/prompt", {"prompt": api_prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body)
        return body["prompt_id"]

    def last_sign_of_life(self) -> float:
        """time.monotonic() of the last websocket message the server sent this harness."""
        return self._listener.last if self._listener else time.monotonic()

    def messages_received(self) -> int:
        return self._listener.messages if self._listener else 0

    def until(self, done, what: str, activity=(), idle_timeout: float | None = None,
              timeout: float | None = None, sleep=time.sleep):
        """Poll `done()` until it returns something truthy (returned). Fails when the server sends no
        message for `idle_timeout` seconds (nor does any `activity()` callable report a later
        time.monotonic()), when it dies, or after `timeout` seconds in total."""
        idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        timeout = TOTAL_TIMEOUT if timeout is None else timeout
        t0 = time.monotonic()
        while True:
            result = done()
            if result:
                return result
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while waiting for {what}:\n{self.log_tail()}")
            now = time.monotonic()
            last = max([self.last_sign_of_life(), t0, *(a() for a in activity)])
            if now - last > idle_timeout:
                raise TimeoutError(f"{what}: no progress from the server for {idle_timeout:.0f}s (hung?); "
                                   f"log tail:\n{self.log_tail(2000)}")
            if now - t0 > timeout:
                raise TimeoutError(f"{what}: still running after {timeout:.0f}s although the server reports progress")
            sleep(0.2)

    def wait(self, prompt_id: str, idle_timeout: float | None = None, timeout: float | None = None,
             activity=(), sleep=time.sleep) -> dict:
        """The prompt's history entry once it finished; progress-aware (see `until`)."""
        def finished():
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            return entry if entry and entry.get("status", {}).get("completed") is not None else None

        return self.until(finished, f"prompt {prompt_id}", activity, idle_timeout, timeout, sleep)

    def run(self, api_prompt: dict, idle_timeout: float | None = None, timeout: float | None = None) -> dict:
        return self.wait(self.queue(api_prompt), idle_timeout, timeout)


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
