"""Every error path answers problem+json with a request id and the security headers."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel, Field
from sqlalchemy import text

from common.app import ComptoirAPI
from common.db import Database
from common.errors import Conflict
from common.settings import CommonSettings, Environment
from tests.conftest import DatabaseFixture, assert_problem, assert_security_headers


class Item(BaseModel):
    name: str = Field(max_length=20)
    price_xaf: int = Field(ge=0, strict=True)


def build_app(environment: Environment = Environment.test) -> ComptoirAPI:
    settings = CommonSettings(environment=environment, max_body_bytes=2048)
    app = ComptoirAPI(
        service="probe",
        settings=settings,
        body_limits=[(r"^/upload$", 8192)],
        multipart_paths=r"^/upload$",
    )

    @app.post("/items", status_code=201)
    async def create(item: Item) -> Item:
        return item

    @app.post("/upload")
    async def upload() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/conflict")
    async def conflict() -> None:
        raise Conflict("That sku is taken.")

    @app.delete("/items/{name}", status_code=204)
    async def remove(name: str) -> None:
        return None

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret database detail at /srv/app/db.py password=hunter2")

    return app


@pytest.fixture
async def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_unknown_path_is_a_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404)


async def test_wrong_method_is_a_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.delete("/items"), 405)


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", content=b'{"name": ', headers={"content-type": "application/json"})
    body = assert_problem(response, 400)
    assert "JSON" in str(body["detail"])


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/items", content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert_problem(response, 415)
    missing = await client.post("/items", content=b"{}", headers={"content-type": ""})
    assert_problem(missing, 415)


async def test_multipart_only_where_uploads_are_taken(client: httpx.AsyncClient) -> None:
    files = {"file": ("a.png", b"x" * 10, "image/png")}
    assert (await client.post("/upload", files=files)).status_code == 200
    assert_problem(await client.post("/items", files=files), 415)


async def test_validation_error_lists_fields_without_echoing_input(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": "s3cr3t-value-xyz" * 3, "price_xaf": 1.5})
    body = assert_problem(response, 422)
    locs = {tuple(err["loc"]) for err in body["errors"]}  # type: ignore[union-attr]
    assert ("body", "name") in locs
    assert ("body", "price_xaf") in locs
    assert "s3cr3t-value-xyz" not in response.text


async def test_service_error_keeps_its_type_and_detail(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/conflict"), 409)
    assert body["type"] == "urn:comptoir:problem:conflict"
    assert body["detail"] == "That sku is taken."


async def test_unhandled_exception_is_a_generic_500(client: httpx.AsyncClient) -> None:
    response = await client.get("/boom")
    body = assert_problem(response, 500)
    assert body["detail"] == "An unexpected error occurred."
    for leak in ("hunter2", "/srv/app", "RuntimeError", "Traceback"):
        assert leak not in response.text


async def test_body_over_the_limit_is_413_by_content_length(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", content=b"x" * 4096, headers={"content-type": "application/json"})
    assert_problem(response, 413)


async def test_body_over_the_limit_is_413_when_chunked(client: httpx.AsyncClient) -> None:
    async def chunks():  # no Content-Length: the limit is enforced while the body streams
        for _ in range(8):
            yield b" " * 1024

    response = await client.post("/items", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(response, 413)


async def test_upload_route_has_its_own_limit(client: httpx.AsyncClient) -> None:
    files = {"file": ("a.png", b"x" * 5000, "image/png")}
    assert (await client.post("/upload", files=files)).status_code == 200
    big = {"file": ("a.png", b"x" * 9000, "image/png")}
    assert_problem(await client.post("/upload", files=big), 413)


async def test_request_id_is_echoed_when_well_formed(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"x-request-id": "client-req-12345678"})
    assert response.headers["x-request-id"] == "client-req-12345678"
    for bad in ("short", "x" * 300, "bad id with spaces", "<script>alert(1)</script>"):
        echoed = (await client.get("/healthz", headers={"x-request-id": bad})).headers["x-request-id"]
        assert echoed != bad
        assert len(echoed) == 36


async def test_success_responses_carry_the_security_headers(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": "soap", "price_xaf": 500})
    assert response.status_code == 201
    assert_security_headers(response)
    assert response.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in response.headers


async def test_hsts_in_production_only() -> None:
    transport = httpx.ASGITransport(app=build_app(Environment.production))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/healthz")
        assert response.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
        # Interactive docs are not served in production; the schema stays on the process's own port.
        assert_problem(await client.get("/docs"), 404)
        assert (await client.get("/openapi.json")).status_code == 200


async def test_metrics_count_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.post("/items", json={"name": "soap", "price_xaf": 1})
    text = (await client.get("/metrics")).text
    assert 'comptoir_http_requests_total{method="POST",route="/items",service="probe",status="201"}' in text
    assert "comptoir_http_request_duration_seconds_bucket" in text


def test_problem_body_is_json_serialisable() -> None:
    from common.errors import problem_body

    assert json.loads(json.dumps(problem_body(404, request_id="r")))["type"].startswith("urn:comptoir:problem:")


async def test_cross_origin_resource_policy_stays_same_origin_unless_a_route_says_otherwise(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/healthz")).headers["cross-origin-resource-policy"] == "same-origin"


async def test_a_value_the_database_cannot_take_is_a_400_that_echoes_nothing(database: DatabaseFixture) -> None:
    """The backstop behind each input's own checks: a data exception (SQLSTATE class 22) raised by the
    database for a request's value is the request's fault, answered 400, never 500."""
    db = Database(database.url("inventory"), schema="inventory", application_name="probe", pool_size=1)
    app = build_app()

    @app.get("/echo")
    async def echo(value: str) -> dict[str, str]:
        async with db.sessionmaker() as session:
            stored = (await session.execute(text("SELECT CAST(:value AS text)"), {"value": value})).scalar_one()
        return {"value": stored}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/echo", params={"value": "savon"})).json() == {"value": "savon"}
            response = await client.get("/echo", params={"value": "sav\x00on-secret"})
            body = assert_problem(response, 400)
            assert body["type"] == "urn:comptoir:problem:bad-request"
            assert "secret" not in response.text
            assert (await client.get("/echo", params={"value": "riz"})).json() == {"value": "riz"}
    finally:
        await db.dispose()


async def test_an_answer_without_content_has_no_content_type(client: httpx.AsyncClient) -> None:
    response = await client.delete("/items/soap")
    assert (response.status_code, response.content) == (204, b"")
    assert "content-type" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    assert_security_headers(response)
