"""POST /orders is served without FastAPI's per-request dependency solving when the body is a valid order
(``services.orders.router._place_directly``), and by FastAPI's own path otherwise. These pin what a client
gets either way: the same problem documents, in the same order of checks (body syntax, then the access
token, then the Idempotency-Key, then the body's fields), and the same documented operation."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import assert_problem
from tests.orders.conftest import System

ORDERS = "/api/v1/orders"
JSON = {"Content-Type": "application/json"}


def line(product_id: str, quantity: object = 1) -> dict[str, object]:
    return {"product_id": product_id, "quantity": quantity}


async def post(system: System, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await system.orders.post(ORDERS, content=body, headers=JSON | headers)


async def order_count(system: System) -> int:
    admin = await system.database.admin()
    try:
        return int(await admin.fetchval("SELECT count(*) FROM orders.orders"))
    finally:
        await admin.close()


NOT_JSON = "The request body is not valid JSON."


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"items": [', NOT_JSON),
        (b"not json", NOT_JSON),
        (b'{"items": [{"product_id": "x", "quantity": 1}]} trailing', NOT_JSON),
        (b"\xff\xfe{", "There was an error parsing the body"),  # not decodable as the text it claims to be
    ],
)
async def test_a_body_that_is_not_json_is_400_before_anything_else(system: System, body: bytes, detail: str) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    for headers in (system.tokens.customer() | key, {}, system.tokens.customer()):
        problem = assert_problem(await post(system, body, headers), 400)
        assert problem["detail"] == detail
    assert await order_count(system) == 0


async def test_checks_run_in_order_token_then_key_then_fields(system: System) -> None:
    product = await system.product()
    invalid = json.dumps({"items": [line(product["id"], "1")]}).encode()
    valid = json.dumps({"items": [line(product["id"])]}).encode()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    for body in (invalid, valid):
        unauthenticated = await post(system, body, key)
        assert_problem(unauthenticated, 401)
        assert unauthenticated.headers["www-authenticate"] == 'Bearer realm="comptoir"'
        # A token sent and refused says so in its challenge (RFC 6750), on the direct path and FastAPI's.
        forged = await post(system, body, key | {"Authorization": "Bearer not-a-token"})
        assert_problem(forged, 401)
        assert 'error="invalid_token"' in forged.headers["www-authenticate"]
        service = system.tokens.service("inventory", "orders")
        not_a_user = await post(system, body, key | service)
        assert_problem(not_a_user, 401)
        assert 'error="invalid_token"' in not_a_user.headers["www-authenticate"]
        for bad_key in ({}, {"Idempotency-Key": " "}, {"Idempotency-Key": "has space"}):
            problem = assert_problem(await post(system, body, system.tokens.customer() | bad_key), 400)
            assert "Idempotency-Key" in str(problem["detail"])
    problem = assert_problem(await post(system, invalid, system.tokens.customer() | key), 422)
    assert problem["errors"] == [{"loc": ["body", "items", 0, "quantity"], "msg": "Input should be a valid integer"}]
    assert await order_count(system) == 0


@pytest.mark.parametrize(
    ("items", "loc"),
    [
        ([{"product_id": "PID", "quantity": 1, "unit_price_xaf": 1}], ["body", "items", 0, "unit_price_xaf"]),
        ([{"product_id": "not-a-uuid", "quantity": 1}], ["body", "items", 0, "product_id"]),
        ([{"product_id": "PID", "quantity": 0}], ["body", "items", 0, "quantity"]),
        ([{"product_id": "PID", "quantity": 1.0}], ["body", "items", 0, "quantity"]),
        ([{"product_id": "PID", "quantity": True}], ["body", "items", 0, "quantity"]),
        ([{"product_id": "PID"}], ["body", "items", 0, "quantity"]),
        ([], ["body", "items"]),
        ([{"product_id": "PID", "quantity": 1}, {"product_id": "PID", "quantity": 2}], ["body", "items"]),
    ],
)
async def test_invalid_fields_are_422_with_their_location(
    system: System, items: list[dict[str, object]], loc: list[object]
) -> None:
    product = await system.product()
    body = json.dumps({"items": items}).replace("PID", product["id"]).encode()
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    problem = assert_problem(await post(system, body, headers), 422)
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert [error["loc"] for error in errors] == [loc]
    assert await order_count(system) == 0


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'{"items": {}}', b"{}", b'{"items": [], "extra": 1}'])
async def test_bodies_of_the_wrong_shape_are_422(system: System, body: bytes) -> None:
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    problem = assert_problem(await post(system, body, headers), 422)
    assert problem["errors"]
    assert await order_count(system) == 0


async def test_json_that_only_python_reads_is_judged_as_before(system: System) -> None:
    """NaN is not JSON, but Python's parser (FastAPI's) reads it: the quantity is then a float, 422."""
    product = await system.product()
    body = b'{"items": [{"product_id": "%s", "quantity": NaN}]}' % product["id"].encode()
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    problem = assert_problem(await post(system, body, headers), 422)
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert [error["loc"] for error in errors] == [["body", "items", 0, "quantity"]]


async def test_a_repeated_member_counts_once_the_last_one(system: System) -> None:
    product = await system.product(stock=5)
    first, last = line(product["id"], "x"), line(product["id"], 2)
    body = f'{{"items": [{json.dumps(first)}], "items": [{json.dumps(last)}]}}'.encode()
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    placed = await post(system, body, headers)
    assert placed.status_code == 201, placed.text
    assert [item["quantity"] for item in placed.json()["items"]] == [2]
    body = f'{{"items": [{json.dumps(last)}], "items": [{json.dumps(first)}]}}'.encode()
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    assert_problem(await post(system, body, headers), 422)
    assert (await system.stock(product["id"]))["reserved"] == 2


async def test_a_valid_order_is_placed_and_replayed_with_the_documented_answer(system: System) -> None:
    product = await system.product(stock=5, price=2500)
    customer = system.tokens.customer()
    headers = customer | {"Idempotency-Key": "order-direct-1"}
    body = json.dumps({"items": [line(product["id"], 2)]}).encode()
    placed = await post(system, body, headers)
    assert placed.status_code == 201, placed.text
    assert placed.headers["content-type"] == "application/json"
    order = placed.json()
    assert placed.headers["location"] == f"{ORDERS}/{order['id']}"
    assert "idempotent-replayed" not in placed.headers
    assert set(order) == {"id", "user_id", "status", "items", "total_xaf", "expires_at", "created_at", "updated_at"}
    assert order["status"] == "pending"
    assert order["total_xaf"] == 5000
    assert order["items"] == [
        {
            "product_id": product["id"],
            "sku": product["sku"],
            "name": product["name"],
            "quantity": 2,
            "unit_price_xaf": 2500,
            "line_total_xaf": 5000,
        }
    ]
    again = await post(system, body, headers)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == order["id"]
    fetched = await system.orders.get(f"{ORDERS}/{order['id']}", headers=customer)
    assert fetched.json() == order


def test_the_operation_is_documented_as_before(system: System) -> None:
    operation = system.orders_app.openapi()["paths"][ORDERS]["post"]
    assert operation["operationId"] == "place_order_api_v1_orders_post"
    assert operation["requestBody"] == {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OrderCreate"}}},
        "required": True,
    }
    assert [(p["in"], p["name"]) for p in operation["parameters"]] == [("header", "Idempotency-Key")]
    assert set(operation["responses"]) == {"201", "400", "409", "422", "503"}
    assert operation["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OrderRead"
    }


async def test_two_idempotency_keys_are_a_400_on_either_path_and_place_nothing(system: System) -> None:
    """Which of two keys would count depends on the proxies between (some merge repeated headers into
    one "a, b" value, some pass both): neither is guessed, the request is refused."""
    product = await system.product()
    valid = json.dumps({"items": [line(product["id"])]}).encode()
    invalid = json.dumps({"items": [line(product["id"], "1")]}).encode()  # FastAPI's own path
    token = system.tokens.customer()
    for body in (valid, invalid):
        headers = [*token.items(), ("Content-Type", "application/json")]
        headers += [("Idempotency-Key", "k1-A"), ("Idempotency-Key", "k2-B")]
        problem = assert_problem(await system.orders.post(ORDERS, content=body, headers=headers), 400)
        assert problem["detail"] == "Send one Idempotency-Key header, not several."
    assert await order_count(system) == 0
    assert (await post(system, valid, token | {"Idempotency-Key": "k2-B"})).status_code == 201
