"""Fixtures of the real-webui tests: see webui_server.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from webui_server import webui, webui_root  # noqa: E402,F401  (pytest fixtures)


def pytest_collection_modifyitems(session, config, items):
    """All a1111 tests, then all forge tests (across both files): one server start per webui."""
    order = {"a1111": 0, "forge": 1}
    idx = [i for i, item in enumerate(items)
           if getattr(getattr(item, "callspec", None), "params", {}).get("webui") in order]
    ours = sorted((items[i] for i in idx), key=lambda it: order[it.callspec.params["webui"]])
    for i, item in zip(idx, ours):
        items[i] = item
