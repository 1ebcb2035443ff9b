"""The bundled default prompt list used when a user trains without giving prompts."""
from __future__ import annotations

import os

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "default_prompts.txt")


def default_prompts() -> list[str]:
    with open(_PATH, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]
