#!/usr/bin/env python3
"""Generate `config` and `rules` of helm/crisp-bridge/values.schema.json from the
binary's own config schema (schemas/config.schema.json, made from the Rust types).

The rest of values.schema.json is hand-written and kept as it is. The conversion:
- `$ref`s are inlined (Helm and draft-07 validators then need no `$defs`);
- the secrets (`amqp.url`, `crisp.identifier`, `crisp.key`) are refused: they come
  from the chart's Secret; their `*_file` keys are allowed (added if the binary's
  schema does not list them yet), the chart sets them when `secretsAs` is `files`;
- durations get a pattern, colors an enum and JSON pointers a pattern, so a typo
  fails at `helm lint`/`helm install` instead of in the pod;
- Rust integer `format`s (uint16, ...) are dropped: they are not draft-07 formats.
Every object keeps `additionalProperties: false`, so `colour:` or `concurency:` fail.

Usage: gen_values_schema.py [--check]   (--check: exit 1 if the file is stale)
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "schemas" / "config.schema.json"
TARGET = ROOT / "helm" / "crisp-bridge" / "values.schema.json"

DURATION = "^([0-9]+(ms|s|m|h))+$"
POINTER = "^(/.*)?$"
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "grey", "black"]
# section -> (secret key, where the chart takes it from)
SECRETS = {
    "amqp": [("url", "secret.amqpUrl")],
    "crisp": [("identifier", "secret.crispIdentifier"), ("key", "secret.crispKey")],
}
# Draft-07 formats worth keeping; Rust ones (uint16, double, ...) are not formats there.
KEEP_FORMATS = {"uri", "email", "uuid", "date-time"}


def inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every `$ref` by a copy of its definition (the types are not recursive)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return inline({**target, **rest}, defs)
        out = {k: inline(v, defs) for k, v in node.items() if k not in ("$defs", "$schema", "title")}
        if isinstance(out.get("format"), str) and out["format"] not in KEEP_FORMATS:
            del out["format"]
        return out
    if isinstance(node, list):
        return [inline(v, defs) for v in node]
    return node


def tighten_durations(section: dict[str, Any]) -> None:
    """String keys whose default is a duration ("500ms", "5m") must look like one."""
    for prop in section.get("properties", {}).values():
        default = prop.get("default")
        if prop.get("type") == "string" and isinstance(default, str) and re.fullmatch(DURATION, default):
            prop["pattern"] = DURATION


def config_schema(source: dict[str, Any]) -> dict[str, Any]:
    defs = source.get("$defs", {})
    props = inline(source["properties"], defs)
    config: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "description": "crisp-bridge.toml without secrets and rules (generated from schemas/config.schema.json).",
        "properties": {},
    }
    for name, section in props.items():
        if name == "rules":
            continue
        for key, origin in SECRETS.get(name, []):
            section["properties"][key] = {
                "not": {},
                "description": f"Not allowed here: it is a secret; set {origin} or existingSecret.",
            }
            section["properties"].setdefault(f"{key}_file", {
                "type": "string",
                "description": f"File holding {name}.{key}; set by the chart when secretsAs is files.",
            })
        tighten_durations(section)
        section["properties"] = dict(sorted(section["properties"].items()))
        config["properties"][name] = section
    return config


def rules_schema(source: dict[str, Any]) -> dict[str, Any]:
    rules = inline(source["properties"]["rules"], source.get("$defs", {}))
    rule = rules["items"]
    p = rule["properties"]
    p["color"] = {**p["color"], "enum": COLORS + [None]}
    p["data"]["additionalProperties"] = {**p["data"]["additionalProperties"], "pattern": POINTER}
    p["when"]["propertyNames"] = {"pattern": POINTER}
    for branch in p["people_id"].get("anyOf", []):
        target = branch["items"] if branch.get("type") == "array" else branch
        target["pattern"] = POINTER
    for key in ("name", "routing_key", "text"):
        p[key]["minLength"] = 1
    return rules


def generate() -> str:
    source = json.loads(SOURCE.read_text())
    values = json.loads(TARGET.read_text())
    values["properties"]["config"] = config_schema(source)
    values["properties"]["rules"] = rules_schema(source)
    return json.dumps(values, indent=2) + "\n"


def main() -> int:
    text = generate()
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python3 .ci/gen_values_schema.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
