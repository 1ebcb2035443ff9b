"""The HTTP route the extension adds (POST /cfg-distill/train) keeps the host's promises, on the REAL
A1111 1.10.1 and Forge: it exists only when the host's API does, and it is guarded exactly like the
host's own /sdapi/v1/* routes (--api-auth: HTTP basic with the host's credentials). A refused
request starts nothing: no refiner file is written.

Each test starts its own server of the host (its own data folder and flags) beside the shared one
of the other real-webui tests, and stops it at the end.
"""
from __future__ import annotations

import os

import pytest
import requests

from webui_server import NAMES, _start, stop

pytestmark = pytest.mark.webui

ROUTE = "/cfg-distill/train"
USERS = {"cfg": "s3cret", "other": "pw2"}  # two users, as --api-auth "u1:p1,u2:p2" allows
BODY = {"prompts": ["a red circle on a blue background"], "steps": 2, "batch_size": 1, "resolution": 64,
        "seed": 0, "name": "auth_probe", "save_every": 0}


def _folder_state(ui) -> set[str]:
    folder = os.path.join(ui.data, "models", "dice_refiners")
    found = set()
    for dirpath, _, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(dirpath, f), folder) for f in files)
    return found


def _log(ui) -> str:
    with open(ui.log, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.mark.parametrize("host", NAMES)
def test_route_is_guarded_by_the_hosts_api_auth(host, webui_root):
    creds = ",".join(f"{u}:{p}" for u, p in USERS.items())
    ui = _start(host, webui_root, "api-auth", add_flags=["--api-auth", creds])
    try:
        url = ui.url
        before = _folder_state(ui)
        for auth in (None, ("cfg", "wrong"), ("nobody", "s3cret"), ("cfg", "s3cret" + " ")):
            own = requests.get(url + "/sdapi/v1/options", auth=auth, timeout=60)
            assert own.status_code == 401, (auth, own.status_code)  # the host's own promise
            r = requests.post(url + ROUTE, json=BODY, auth=auth, timeout=60)
            assert r.status_code == 401, (auth, r.status_code, r.text[:500])
            assert r.json().get("detail") == own.json().get("detail"), (r.text, own.text)  # the host's answer
        assert _folder_state(ui) == before, "a refused request wrote a file"
        assert "training DICE refiner" not in _log(ui), "a refused request started a run"

        # Either user of --api-auth gets through, like the host's own routes.
        r = requests.post(url + ROUTE, json={"steps": 5, "colour": "red"}, auth=("other", USERS["other"]),
                          timeout=60)
        assert r.status_code == 400 and "colour" in r.text, (r.status_code, r.text[:500])
        r = requests.post(url + ROUTE, json=BODY, auth=("cfg", "s3cret"), timeout=600)
        assert r.status_code == 200, (r.status_code, r.text[:2000], ui.tail())
        out = r.json()
        assert out["ok"], out["message"]
        assert os.path.isfile(out["path"]) and "auth_probe.safetensors" in _folder_state(ui)
    finally:
        stop(ui)


@pytest.mark.parametrize("host", NAMES)
def test_route_does_not_exist_without_the_hosts_api(host, webui_root):
    """The full UI without --api (and with the gradio login, which these hosts never put on their
    API): the host has no /sdapi/v1/*, and the extension adds no route either."""
    ui = _start(host, webui_root, "no-api", drop_flags=["--api", "--nowebui"],
                add_flags=["--gradio-auth", "g:h"])
    try:
        url = ui.url
        before = _folder_state(ui)
        for auth in (None, ("g", "h")):
            own = requests.get(url + "/sdapi/v1/options", auth=auth, timeout=60)
            assert own.status_code == 404, (auth, own.status_code)  # the host's API is really off
            r = requests.post(url + ROUTE, json=BODY, auth=auth, timeout=60)
            assert r.status_code in (404, 405), (auth, r.status_code, r.text[:500])
        assert _folder_state(ui) == before
        log = _log(ui)
        assert "training DICE refiner" not in log
        assert f"{ROUTE} is not added" in log, ui.tail()
    finally:
        stop(ui)
