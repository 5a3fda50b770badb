"""``comptoir openapi``: the public OpenAPI document, built offline, and the API reference (docs/api.md) from it.

The document is what the gateway serves at ``/api/v1/openapi.json``: the same merge of the services' own
schemas (``gateway.openapi.merge``), built here from the service apps without starting anything. The
reference is rendered from it, so the two cannot drift (``tests/gateway/test_openapi.py`` fails when
docs/api.md is not what ``make docs`` would write).
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from gateway.openapi import merge

SERVICES = ("auth", "inventory", "orders", "audit")
# Listed once under "Response headers" rather than on every line.
_ON_EVERY_ANSWER = frozenset({"X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"})
_METHOD_ORDER = {"get": 0, "post": 1, "put": 2, "patch": 3, "delete": 4}


def build_document() -> dict[str, Any]:
    """The public document, from each service app's own schema (no database is touched)."""
    documents = {}
    for name in SERVICES:
        main = importlib.import_module(f"services.{name}.main")
        config = importlib.import_module(f"services.{name}.config")
        app = main.create_app(config.Settings(database_url="postgresql://unused@localhost/x", environment="test"))
        documents[name] = app.openapi()
    return merge(documents)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(schema: dict[str, Any]) -> str:
    if schema.get("nullable"):
        return _type({k: v for k, v in schema.items() if k != "nullable"}) + " \\| null"
    if len(schema.get("allOf", ())) == 1:
        return _type(schema["allOf"][0])
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[`{name}`](#{name.lower()})"
    if "anyOf" in schema:
        return " \\| ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of {_type(schema['additionalProperties'])}"
    fmt = schema.get("format")
    return f"{kind} ({fmt})" if fmt else str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    keys = ("minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems", "pattern")
    parts = [f"{key} `{schema[key]}`" for key in keys if key in schema]
    for variant in schema.get("anyOf", ()):
        parts.extend(f"{key} `{variant[key]}`" for key in keys if key in variant)
    return ", ".join(parts)


def _body_of(content: dict[str, Any]) -> str:
    return ", ".join(f"{_type(c.get('schema', {}))} ({media})" for media, c in content.items())


def _operation(lines: list[str], method: str, path: str, op: dict[str, Any]) -> None:
    if op.get("security"):
        auth = "bearer token"
    elif "401" in op.get("responses", {}):
        auth = "none (a token that is sent must be valid)"
    else:
        auth = "none (an Authorization header is ignored)"
    lines += [f"### {method.upper()} `{path}`", "", _cell(op.get("description") or op.get("summary", "")), ""]
    lines.append(f"- Authentication: {auth}")
    for parameter in op.get("parameters", []):
        required = "required" if parameter.get("required") else "optional"
        schema = parameter.get("schema", {})
        extra = _constraints(schema)
        description = _cell(parameter.get("description", ""))
        text = f"- {parameter['in']} `{parameter['name']}` ({required}): {_type(schema)}"
        text += f"; {extra}" if extra else ""
        text += f". {description}" if description else ""
        lines.append(text)
    body = op.get("requestBody")
    if body is not None:
        required = "required" if body.get("required") else "optional"
        lines.append(f"- Body ({required}): {_body_of(body.get('content', {}))}")
    lines += ["", "| status | meaning | body | headers |", "|---|---|---|---|"]
    for code, response in sorted(op.get("responses", {}).items()):
        headers = ", ".join(
            f"`{name}`" + ("" if header.get("required") else " (optional)")
            for name, header in response.get("headers", {}).items()
            if name not in _ON_EVERY_ANSWER
        )
        content = _body_of(response.get("content", {})) or "none"
        lines.append(f"| {code} | {_cell(response.get('description', ''))} | {content} | {headers} |")
    lines.append("")


def _schema(lines: list[str], name: str, schema: dict[str, Any]) -> None:
    lines += [f"### {name}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    properties = schema.get("properties", {})
    if not properties:
        lines += [f"{_type(schema)}", ""]
        return
    required = set(schema.get("required", ()))
    lines += ["| field | type | required | notes |", "|---|---|---|---|"]
    for field, prop in properties.items():
        notes = "; ".join(x for x in (_cell(prop.get("description", "")), _constraints(prop)) if x)
        lines.append(f"| `{field}` | {_type(prop)} | {'yes' if field in required else 'no'} | {notes} |")
    if schema.get("additionalProperties") is True:
        lines.append("| … | any | no | other members may be added |")
    lines.append("")


def render_markdown(document: dict[str, Any]) -> str:
    """The API reference: every operation with its parameters, statuses, bodies and headers; every schema."""
    lines = [
        "# API reference",
        "",
        "<!-- Generated from the public OpenAPI document by `make docs` (`comptoir openapi --markdown`);",
        "     do not edit: tests/gateway/test_openapi.py fails when this file differs from the document. -->",
        "",
        f"{document['info']['title']}, version {document['info']['version']}. The same document is served by "
        "the gateway at `GET /api/v1/openapi.json`.",
        "",
        _cell(document["info"].get("description", "")),
        "",
        "## Operations",
        "",
        "| method | path | summary | authentication |",
        "|---|---|---|---|",
    ]
    operations = sorted(
        ((path, method, op) for path, item in document["paths"].items() for method, op in item.items()),
        key=lambda entry: (entry[0], _METHOD_ORDER.get(entry[1], 9)),
    )
    for path, method, op in operations:
        auth = "bearer" if op.get("security") else "none"
        lines.append(f"| {method.upper()} | `{path}` | {_cell(op.get('summary', ''))} | {auth} |")
    lines.append("")
    tags: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, method, op in operations:
        tags.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag, entries in tags.items():
        lines += [f"## {tag}", ""]
        for path, method, op in entries:
            _operation(lines, method, path, op)
    lines += [
        "## Response headers",
        "",
        "Every answer carries `X-Request-ID`; every answer that passed the rate limiter carries `RateLimit-Limit`, "
        "`RateLimit-Remaining` and `RateLimit-Reset` (the tables above list the other headers).",
        "",
    ]
    for name, header in document["components"].get("headers", {}).items():
        lines.append(f"- `{name}`: {_cell(header.get('description', ''))}")
    lines += ["", "## Schemas", ""]
    for name, schema in document["components"]["schemas"].items():
        _schema(lines, name, schema)
    return "\n".join(lines).rstrip() + "\n"
