"""Fixtures of the real-webui tests: see webui_server.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from webui_server import webui, webui_root  # noqa: E402,F401  (pytest fixtures)
