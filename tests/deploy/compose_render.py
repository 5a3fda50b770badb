"""Render docker-compose.yml as `docker compose config` would, without Docker.

No compose CLI comes from the package registries this project installs from (Debian's only candidate,
docker-compose 1.29, predates the Compose Specification this file uses: top-level ``name``, merge lists),
so the file is parsed with PyYAML (which resolves anchors and ``<<`` merges as compose does) and every
string is interpolated with compose's rules:

- ``$$`` is a literal ``$``;
- ``$VAR`` and ``${VAR}``: the value, empty when unset;
- ``${VAR:-default}`` (unset or empty) and ``${VAR-default}`` (unset): the default, itself interpolated;
- ``${VAR:?message}`` (unset or empty) and ``${VAR?message}`` (unset): an error with the message;
- ``${VAR:+other}`` (set and non-empty) and ``${VAR+other}`` (set): the other value.

The ``.env`` file is read with compose's dotenv rules for the cases this project uses: ``KEY=VALUE``
lines, ``#`` comments, single quotes literal, double quotes with ``\\n`` escapes, the last value wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(rf"\$(?:(?P<escape>\$)|\{{(?P<braced>{_NAME})(?P<op>:?[-?+])?|(?P<bare>{_NAME}))")


class InterpolationError(ValueError):
    pass


def parse_dotenv(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(_NAME, name.strip()):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace("\\n", "\n").replace('\\"', '"')
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].rstrip()
        values[name.strip()] = value
    return values


def _closing_brace(text: str, start: int) -> int:
    """The index of the ``}`` that closes a ``${`` whose argument starts at ``start`` (nested ``${}`` allowed)."""
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise InterpolationError(f"unterminated ${{ in {text!r}")


def interpolate(text: str, env: dict[str, str]) -> str:
    out: list[str] = []
    pos = 0
    while True:
        match = _TOKEN.search(text, pos)
        if match is None:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos : match.start()])
        if match.group("escape"):
            out.append("$")
            pos = match.end()
            continue
        if match.group("bare"):
            out.append(env.get(match.group("bare"), ""))
            pos = match.end()
            continue
        name, op = match.group("braced"), match.group("op")
        end = _closing_brace(text, match.end())
        argument = text[match.end() : end]
        if op is None and argument:
            raise InterpolationError(f"invalid interpolation format: ${{{name}{argument}}}")
        value = env.get(name)
        is_set, non_empty = value is not None, bool(value)
        present = non_empty if op and op.startswith(":") else is_set
        kind = (op or "")[-1:]
        if kind == "-":
            out.append(value if present and value is not None else interpolate(argument, env))
        elif kind == "?":
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {argument}")
            out.append(value or "")
        elif kind == "+":
            out.append(interpolate(argument, env) if present else "")
        else:
            out.append(value or "")
        pos = end + 1


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def render(compose_file: Path, env: dict[str, str]) -> dict[str, Any]:
    """The compose model with every variable substituted (``x-`` extension fields dropped, as compose does)."""
    data = yaml.safe_load(compose_file.read_text(encoding="utf-8"))
    rendered = _walk({k: v for k, v in data.items() if not str(k).startswith("x-")}, env)
    assert isinstance(rendered, dict)
    return rendered


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}
