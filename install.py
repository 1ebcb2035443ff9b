"""Installs what cfg-distill needs besides torch, for both hosts that run this file:

- AUTOMATIC1111 / Forge run it (with their own Python) at every start and after installing the
  extension; `import launch` works there, and launch.is_installed / launch.run_pip are the
  webui's own way to install.
- ComfyUI-Manager runs it after installing the pack; there is no `launch` module, so the same
  packages are checked with importlib and only the missing ones are pip-installed.

torch is never installed (it must match the host's CUDA / ROCm / CPU build). Idempotent: when
everything is present nothing is installed and the network is not used.
"""
import importlib.util
import subprocess
import sys

# pip name -> import name; the same set as pyproject.toml's dependencies.
REQUIRED = {"safetensors": "safetensors", "numpy": "numpy"}


def _webui_launch():
    """The webui's launch module, or None under ComfyUI (or a look-alike without the helpers)."""
    try:
        import launch
    except ImportError:
        return None
    if callable(getattr(launch, "is_installed", None)) and callable(getattr(launch, "run_pip", None)):
        return launch
    return None


def missing_packages(is_installed) -> list:
    return [pip_name for pip_name, module in REQUIRED.items() if not is_installed(module)]


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> int:
    if not _importable("torch"):
        print("[cfg-distill] torch is not installed in this Python; install the build that matches "
              "your GPU (this installer never installs torch).")
    launch = _webui_launch()
    if launch is not None:
        for pip_name in missing_packages(launch.is_installed):
            launch.run_pip(f"install {pip_name}", f"{pip_name} for cfg-distill")
        return 0
    missing = missing_packages(_importable)
    if not missing:
        return 0
    print(f"[cfg-distill] installing {', '.join(missing)}")
    return subprocess.call([sys.executable, "-m", "pip", "install", *missing])


if __name__ == "__main__":
    sys.exit(main())
