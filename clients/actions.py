"""Action policies built from a pipeline's action JSON Schema (``ready.action_schema``).

* :class:`RandomPolicy` draws seeded random actions valid for the schema (enums → a choice,
  integers → a uniform draw in a small range inside the bounds, booleans, numbers).
* :class:`ScriptedPolicy` replays a list of actions, cycling. Scripts are written as
  ``up,up,left`` (shorthand for the schema's single enum property, e.g. ``{"move": "up"}``), as
  JSON values (``{"x":1,"y":0}``), or read from a file (one action per line or a JSON list).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

INT_SPAN = 8
"""Random integers are drawn from ``[-INT_SPAN, INT_SPAN]`` clipped to the schema's bounds."""


class ActionPolicy(Protocol):
    def __call__(self, step: int) -> Any:
        """The action (JSON value) for AR step ``step``."""
        ...


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/$defs/Name``) and unwrap single ``allOf``/``anyOf``."""
    seen = 0
    while seen < 16:
        seen += 1
        if "$ref" in node:
            ref = str(node["$ref"])
            target: Any = schema
            for part in ref.lstrip("#/").split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        elif len(node.get("allOf", [])) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            node = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            return node
    return node


def properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The schema's top-level properties with ``$ref``\\ s resolved."""
    props = _resolve(schema, schema).get("properties", {})
    return {name: _resolve(schema, p) for name, p in props.items()}


def enum_property(schema: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """``(name, values)`` of the first enum property (e.g. ``move``), if any."""
    for name, prop in properties(schema).items():
        if isinstance(prop.get("enum"), list) and prop["enum"]:
            return name, list(prop["enum"])
        if "const" in prop:
            return name, [prop["const"]]
    return None


def random_value(prop: dict[str, Any], rng: random.Random) -> Any:
    """A random value satisfying one resolved property schema."""
    if "enum" in prop:
        return rng.choice(prop["enum"])
    if "const" in prop:
        return prop["const"]
    kind = prop.get("type")
    if kind == "integer":
        lo = max(int(prop.get("minimum", -INT_SPAN)), -INT_SPAN)
        hi = min(int(prop.get("maximum", INT_SPAN)), INT_SPAN)
        if lo > hi:
            lo = hi = int(prop.get("minimum", prop.get("maximum", 0)))
        return rng.randint(lo, hi)
    if kind == "number":
        flo = float(prop.get("minimum", -1.0))
        fhi = float(prop.get("maximum", 1.0))
        return rng.uniform(flo, fhi)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        return prop.get("default", "")
    return prop.get("default")


class RandomPolicy:
    """Seeded random actions valid for ``schema`` (same seed → same sequence).

    ``repeat`` keeps each drawn action for that many steps, like a player holding a key.
    """

    def __init__(self, schema: dict[str, Any], seed: int = 0, repeat: int = 1) -> None:
        self.schema = schema
        self.rng = random.Random(seed)
        self.repeat = max(1, repeat)
        self.props = properties(schema)
        self._current: Any = None

    def __call__(self, step: int) -> Any:
        if self._current is None or step % self.repeat == 0:
            if not self.props:
                self._current = None
            else:
                self._current = {n: random_value(p, self.rng) for n, p in self.props.items()}
        return self._current


class ScriptedPolicy:
    """Replays ``actions`` (cycling when the script is shorter than the run)."""

    def __init__(self, actions: Sequence[Any]) -> None:
        if not actions:
            raise ValueError("a scripted policy needs at least one action")
        self.actions = list(actions)

    def __call__(self, step: int) -> Any:
        return self.actions[step % len(self.actions)]


def parse_action(text: str, schema: dict[str, Any]) -> Any:
    """One action from a script token: JSON (``{"x":1}``, ``null``) or an enum value (``up``)."""
    token = text.strip()
    if token.startswith(("{", "[")) or token in {"null", "true", "false"}:
        return json.loads(token)
    enum = enum_property(schema)
    if enum is None:
        raise ValueError(
            f"action {token!r} is not JSON and the action schema has no enum property to map it "
            f"to; write actions as JSON objects, e.g. "
            f"{json.dumps({n: 0 for n in properties(schema)}) or '{}'}"
        )
    name, values = enum
    if token not in {str(v) for v in values}:
        raise ValueError(f"unknown action {token!r}; {name!r} must be one of {values}")
    return {name: next(v for v in values if str(v) == token)}


def parse_script(spec: str, schema: dict[str, Any]) -> list[Any]:
    """Actions from ``a,b,c`` / JSON values separated by ``;`` or newlines / ``@file``/a path.

    Files hold a JSON list or one action per line (``#`` comments allowed).
    """
    text = spec
    path = Path(spec[1:] if spec.startswith("@") else spec)
    if spec.startswith("@") or (len(spec) < 4096 and path.suffix and path.is_file()):
        text = path.read_text()
    if text.strip().startswith("["):
        return list(json.loads(text))
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    tokens: list[str] = []
    for line in lines:
        if not line:
            continue
        if line.startswith("{"):
            tokens += [t for t in line.split(";") if t.strip()]
        else:
            tokens += [t for t in line.replace(";", ",").split(",") if t.strip()]
    return [parse_action(t, schema) for t in tokens]


def make_policy(
    schema: dict[str, Any], *, script: str | None = None, seed: int = 0, repeat: int = 1
) -> ActionPolicy:
    """A scripted policy if ``script`` is given, else a seeded random one."""
    if script:
        return ScriptedPolicy(parse_script(script, schema))
    return RandomPolicy(schema, seed=seed, repeat=repeat)


def actions(policy: ActionPolicy, start: int, count: int) -> Iterator[Any]:
    """``count`` actions for steps ``start, start+1, ...``."""
    for k in range(start, start + count):
        yield policy(k)
