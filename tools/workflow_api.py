"""Convert a saved UI workflow (nodes + links + positional widgets_values, the format ComfyUI
saves and example_workflows/ holds) to the API prompt format, driven by /object_info.

The browser tests prove the same files through the real frontend (app.graphToPrompt); this small
converter serves the headless demo and the server tests."""
from __future__ import annotations

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _widget_inputs(info: dict) -> list[tuple[str, dict]]:
    """Inputs that are widgets (have a value), in the order the frontend lays out widgets_values."""
    out = []
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append((name, opts))
    return out


def to_api(workflow: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}

    def source(link_id):
        """Follow reroutes back to the real producing node: (node_id, slot)."""
        _, origin, slot, *_ = links[link_id]
        node = nodes[origin]
        while node["type"] == "Reroute":
            link_id = node["inputs"][0]["link"]
            _, origin, slot, *_ = links[link_id]
            node = nodes[origin]
        return str(origin), slot

    api = {}
    for nid, node in nodes.items():
        if node["type"] in VIRTUAL or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type {node['type']!r} is not installed on this server")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            inputs.update(node["widgets_values"])
        else:
            for name, opts in _widget_inputs(info):
                if not values:
                    break
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                    values.pop(0) if values and isinstance(values[0], str) else None
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                inputs[inp["name"]] = list(source(inp["link"]))
        api[str(nid)] = {"class_type": node["type"], "inputs": inputs}
    return api
