"""modules.infotext_utils (a1111.md "UI": infotext). The webui writes p.extra_generation_params into
the last line of the PNG info as `Key: value` pairs (values with , : or newlines JSON-quoted);
"send to txt2img" parses that line back into a dict of STRINGS and, for each (component, key) of a
script's infotext_fields, sets the component: a callable key is called with the dict; None leaves
the component as it is; other values are converted to the type of the component's current value
("False" gives False for a checkbox)."""
import json
import re

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x):
    lines = x.strip().split("\n")
    *head, last = lines
    res = {}
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for key, value in _PARAM.findall(last):
        res[key.strip()] = unquote(value.strip())
    return res


def paste_values(infotext_fields, params):
    """What connect_paste would set: {component: new value} for the fields it changes."""
    out = {}
    for component, key in infotext_fields:
        v = key(params) if callable(key) else params.get(key)
        if v is None:
            continue
        current = getattr(component, "value", None)
        if isinstance(v, dict) and str(v.get("__type__", "")).endswith("update"):
            out[component] = v.get("value")
        elif isinstance(current, bool):
            out[component] = v if isinstance(v, bool) else v != "False"
        elif current is not None and not isinstance(v, type(current)):
            out[component] = type(current)(v)
        else:
            out[component] = v
    return out
