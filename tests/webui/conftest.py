"""Fixtures of the real-webui tests: see webui_server.py."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from webui_server import webui, webui_root  # noqa: E402,F401  (pytest fixtures)


def _host(item):
    """(webui, own server?): the shared server's tests take `webui`, those that start their own a
    `host` parameter."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "webui" in params:
        return params["webui"], 0
    if "host" in params:
        return params["host"], 1
    return None, 0


def pytest_collection_modifyitems(session, config, items):
    """All a1111 tests, then all forge tests, then all reforge tests (across the files): one shared server start per webui;
    the tests with their own server of a webui run after those of its shared one."""
    order = {"a1111": 0, "forge": 1, "reforge": 2}
    idx = [i for i, item in enumerate(items) if _host(item)[0] in order]
    ours = sorted((items[i] for i in idx), key=lambda it: (order[_host(it)[0]], _host(it)[1]))
    for i, item in zip(idx, ours):
        items[i] = item
