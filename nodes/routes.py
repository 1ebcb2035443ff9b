"""Read-only HTTP route for the frontend: GET /cfg_distill/refiner_info?name=<listed refiner>.

The loader node shows a refiner's metadata (family, token dim, trained guidance...) before anything
is queued. Security rule: the client only ever names an entry of folders.refiner_names(); that name
is looked up in the list and resolved by folder_paths, so no client text becomes a path. Names that
look like paths (absolute, '..', NUL, drive letters) are refused up front with 400, unknown names
with 404; only the safetensors header is read (read_refiner_info), never the tensors."""
from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ..cfg_distill.families import FAMILIES
from ..cfg_distill.refiner_file import RefinerFileError, read_refiner_info
from . import folders

ROUTE = "/cfg_distill/refiner_info"


def _looks_like_path_trick(name: str) -> bool:
    norm = name.replace("\\", "/")
    return ("\0" in name or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":")
            or ".." in norm.split("/"))


def _error(status: int, message: str, name: str) -> web.Response:
    return web.json_response({"error": message, "name": name}, status=status)


def info_payload(name: str) -> tuple[int, dict]:
    """(status, JSON body) for a refiner name; separate from aiohttp so it is easy to reason about."""
    if not name:
        return 400, {"error": "missing ?name=<refiner file name>", "name": name}
    if _looks_like_path_trick(name):
        return 400, {"error": "refiner names are plain entries of the dice_refiners list, not paths", "name": name}
    if name not in folders.refiner_names():  # the list is the only gate to the file system
        return 404, {"error": f"{name!r} is not a refiner in the dice_refiners folders", "name": name}
    try:
        info = read_refiner_info(folders.refiner_path(name))
    except (RefinerFileError, OSError) as e:
        # A listed but unusable file (truncated, pickle...): the UI shows why before queueing.
        return 422, {"error": str(e), "name": name}
    family = FAMILIES.get(info.base_family, FAMILIES["other"])
    return 200, {
        "name": name, "base_family": info.base_family, "family_label": family.label.split(" (")[0],
        "token_dim": info.token_dim, "inner_dim": info.inner_dim, "heads": info.heads, "guidance_scale": info.guidance_scale,
        "train_steps": info.train_steps, "base_checkpoint": info.base_checkpoint,
        "base_hash": info.base_hash, "keep_first_token": info.keep_first_token,
        "has_metadata": info.has_metadata, "summary": info.summary(),
    }


async def refiner_info(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    # Header reads are small, but a slow disk must not stall the event loop.
    status, body = await asyncio.get_running_loop().run_in_executor(None, info_payload, name)
    if status != 200:
        return _error(status, body["error"], name)
    return web.json_response(body)


def register() -> bool:
    """Add the route to the running PromptServer; a no-op in library mode (no server module loaded)."""
    if "server" not in sys.modules:
        return False
    from server import PromptServer

    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    instance.routes.get(ROUTE)(refiner_info)
    return True


register()
