"""install.py under both hosts (no network, nothing really installed) and the extension index entry."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_install():
    spec = importlib.util.spec_from_file_location("cfg_distill_install_under_test", os.path.join(ROOT, "install.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_launch(monkeypatch):
    """The webui's launch module: is_installed / run_pip (a1111.md "Extension layout")."""
    launch = types.ModuleType("launch")
    launch.installed = {"numpy"}
    launch.pip_calls = []
    launch.is_installed = lambda package: package in launch.installed
    launch.run_pip = lambda command, desc=None: launch.pip_calls.append((command, desc))
    monkeypatch.setitem(sys.modules, "launch", launch)
    return launch


def test_webui_installs_only_what_is_missing_with_its_own_pip(fake_launch, monkeypatch):
    install = load_install()
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("the webui's run_pip must be used"))
    assert install.main() == 0
    assert fake_launch.pip_calls == [("install safetensors", "safetensors for cfg-distill")]
    fake_launch.installed.add("safetensors")
    fake_launch.pip_calls.clear()
    assert install.main() == 0 and fake_launch.pip_calls == []


def test_comfyui_manager_path_installs_only_what_is_missing_and_never_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "launch", None)  # `import launch` fails, as under ComfyUI
    install = load_install()
    present = {"torch", "safetensors"}
    monkeypatch.setattr(install, "_importable", lambda module: module in present)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert install.main() == 0
    assert calls == [[sys.executable, "-m", "pip", "install", "numpy"]]

    present.add("numpy")
    calls.clear()
    assert install.main() == 0 and calls == [], "idempotent: nothing to do, no pip, no network"

    present.discard("torch")
    assert install.main() == 0 and calls == [], "torch is reported, never installed"


def test_install_script_runs_as_the_hosts_run_it():
    """Both hosts run `python install.py`; here everything is present, so it only checks."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stdout


def test_extension_index_entry():
    with open(os.path.join(ROOT, "webui-extension-index.json"), encoding="utf8") as f:
        entry = json.load(f)
    assert set(entry) == {"name", "url", "description", "tags"}
    assert entry["tags"] == ["tab", "training", "manipulations"]
    assert entry["url"].endswith(".git")
