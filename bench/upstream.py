"""The benchmark's upstream: a tiny JSON endpoint (and the JWKS the gateway verifies tokens with)."""

import json
import os
from pathlib import Path
from typing import Any

_JWKS = Path(os.environ.get("BENCH_JWKS", "/nonexistent"))
_BODY = b'{"items":[],"next_cursor":null}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = _JWKS.read_bytes() if scope["path"].endswith("jwks.json") else _BODY
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    print(json.dumps({"body": _BODY.decode()}))  # noqa: T201


def fastapi_app() -> Any:
    """The same tiny endpoint as a FastAPI app: what the services behind the gateway really are."""
    from fastapi import FastAPI
    from starlette.responses import Response

    api = FastAPI()

    @api.get("/api/v1/products")
    async def products() -> dict[str, object]:
        return {"items": [], "next_cursor": None}

    @api.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        return Response(_JWKS.read_bytes(), media_type="application/json")

    return api
