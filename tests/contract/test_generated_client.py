"""The public OpenAPI document is a contract: a client generated from it drives a whole shop.

The real system runs (``comptoir run``'s processes over real HTTP); its live ``/api/v1/openapi.json`` is
fed to openapi-python-client (pinned dev dependency) at test time, and the generated package is imported
and used for every call. Each answer is asserted as the typed object the document promises; a status the
document does not declare raises (``raise_on_unexpected_status``) and a body that does not match its
model fails to parse, so either fails the test.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pyotp
import pytest

from comptoir.openapi import build_document
from tests.e2e.harness import RunningSystem, new_system
from tests.support.accounts import TERMS_VERSION

pytestmark = pytest.mark.e2e

PACKAGE = "comptoir_contract_client"
ADMIN_EMAIL = "owner@boutique.cm"
ADMIN_PASSWORD = "purple gorilla mango tractor 77"
PASSWORD = "correct horse battery staple 42"
TERMS = TERMS_VERSION  # AUTH_TERMS_VERSION's default: the version a new account accepts
RESETS_PER_HOUR = 2
GENERATOR_CONFIG = {
    # Images are bytes: the generator reads any binary answer as application/octet-stream.
    "content_type_overrides": {f"image/{kind}": "application/octet-stream" for kind in ("jpeg", "png", "webp")},
    "post_hooks": [],
}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    running = new_system(tmp_path_factory.mktemp("contract"))
    running.env |= {
        "AUTH_PBKDF2_ROUNDS": "1000",
        "LOG_LEVEL": "WARNING",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN_EMAIL,
        "BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        # One route's limit lowered so that the test meets a real 429 (the rest stay out of the way).
        "GATEWAY_ANONYMOUS_RATE_LIMIT": "100000/hour",
        "GATEWAY_AUTHENTICATED_RATE_LIMIT": "100000/hour",
        "GATEWAY_ROUTE_RATE_LIMITS": f"POST /api/v1/auth/password-reset/request={RESETS_PER_HOUR}/hour",
    }
    running.start()
    try:
        yield running
    finally:
        assert running.stop() == 0


@pytest.fixture(scope="module")
def live_document(system: RunningSystem) -> dict[str, Any]:
    response = httpx.get(system.url() + "/api/v1/openapi.json", timeout=30)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture(scope="module")
def client_package(live_document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("generated")
    (root / "openapi.json").write_text(json.dumps(live_document), encoding="utf-8")
    (root / "config.json").write_text(json.dumps(GENERATOR_CONFIG), encoding="utf-8")
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            str(root / "openapi.json"),
            "--output-path",
            str(root / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(root / "config.json"),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


class Api:
    """The generated package: ``api.call("auth", "login", body=...)`` runs its ``sync_detailed``."""

    def __init__(self, package: ModuleType, base_url: str) -> None:
        self.package = package
        self.base_url = base_url
        self.models = importlib.import_module(PACKAGE + ".models")

    def client(self, token: str | None = None) -> Any:
        if token is None:
            return self.package.Client(base_url=self.base_url, raise_on_unexpected_status=True, timeout=30)
        return self.package.AuthenticatedClient(
            base_url=self.base_url, token=token, raise_on_unexpected_status=True, timeout=30
        )

    def operation(self, tag: str, name: str) -> Callable[..., Any]:
        folder = Path(importlib.import_module(f"{PACKAGE}.api.{tag}").__file__ or "").parent
        matches = [p.stem for p in folder.glob("*.py") if p.stem == name or p.stem.startswith(name + "_api_v1_")]
        assert len(matches) == 1, (tag, name, matches)
        module = importlib.import_module(f"{PACKAGE}.api.{tag}.{matches[0]}")
        return module.sync_detailed  # type: ignore[no-any-return]

    def call(self, tag: str, name: str, token: str | None = None, **kwargs: Any) -> Any:
        return self.operation(tag, name)(client=self.client(token), **kwargs)

    def __getattr__(self, model: str) -> Any:
        return getattr(self.models, model)


def parsed(response: Any, status: int, model: type) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert isinstance(response.parsed, model), (type(response.parsed), response.content[:500])
    return response.parsed


def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll a condition the system reaches on its own (revocation feed, audit relay), up to a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_live_document_is_the_documented_one(live_document: dict[str, Any]) -> None:
    # What the gateway serves is what `comptoir openapi` builds (and docs/api.md is rendered from).
    assert live_document == build_document()


def test_a_whole_shop_through_the_generated_client(system: RunningSystem, client_package: ModuleType) -> None:
    api = Api(client_package, system.url())

    health = parsed(api.call("health", "system_health"), 200, api.SystemHealth)
    assert health.status == api.SystemHealthStatus.OK
    jwks = parsed(api.call("auth", "jwks_public"), 200, api.JWKS)
    assert jwks.keys
    assert jwks.keys[0].kty == api.JWKKty.OKP

    # register, login, refresh, logout
    email = f"awa-{uuid.uuid4().hex[:8]}@boutique.cm"
    user = parsed(
        api.call(
            "auth",
            "register",
            body=api.RegisterRequest(
                email=email, password=PASSWORD, phone="6 71 23 45 67", accept_terms=True, terms_version=TERMS
            ),
        ),
        201,
        api.UserRead,
    )
    assert user.role == api.UserReadRole.CUSTOMER
    assert user.phone == "+237671234567"
    taken = parsed(
        api.call(
            "auth",
            "register",
            body=api.RegisterRequest(email=email, password=PASSWORD, accept_terms=True, terms_version=TERMS),
        ),
        409,
        api.Problem,
    )
    assert taken.status == 409
    weak = parsed(
        api.call(
            "auth",
            "register",
            body=api.RegisterRequest(email=f"x{email}", password="password", accept_terms=True, terms_version=TERMS),
        ),
        422,
        api.ValidationProblem,
    )
    assert weak.errors
    assert all(isinstance(error, api.FieldError) and error.loc[:2] == ["body", "password"] for error in weak.errors)

    first = parsed(
        api.call("auth", "login", body=api.LoginRequest(email=email, password=PASSWORD)), 200, api.LoginResponse
    )
    pair = parsed(
        api.call("auth", "refresh", body=api.RefreshRequest(refresh_token=first.refresh_token)),
        200,
        api.RefreshResponse,
    )
    assert pair.token_type == api.RefreshResponseTokenType.BEARER
    assert parsed(api.call("auth", "me", pair.access_token), 200, api.UserRead).email == email
    spent = parsed(
        api.call("auth", "refresh", body=api.RefreshRequest(refresh_token=first.refresh_token)), 401, api.Problem
    )
    assert spent.status == 401
    # The reuse above revoked that session: sign in again, then log out properly.
    pair = parsed(
        api.call("auth", "login", body=api.LoginRequest(email=email, password=PASSWORD)), 200, api.LoginResponse
    )
    logout = api.call("auth", "logout", pair.access_token, body=api.LogoutRequest(refresh_token=pair.refresh_token))
    assert logout.status_code == 204
    eventually(lambda: api.call("auth", "me", pair.access_token).status_code == 401, "the logout to reach the gateway")
    assert isinstance(api.call("auth", "me", pair.access_token).parsed, api.Problem)
    customer = parsed(
        api.call("auth", "login", body=api.LoginRequest(email=email, password=PASSWORD)), 200, api.LoginResponse
    ).access_token

    # staff: an admin promotes a registered user
    admin = parsed(
        api.call("auth", "login", body=api.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)),
        200,
        api.LoginResponse,
    ).access_token
    staff_email = f"staff-{uuid.uuid4().hex[:8]}@boutique.cm"
    member = parsed(
        api.call(
            "auth",
            "register",
            body=api.RegisterRequest(email=staff_email, password=PASSWORD, accept_terms=True, terms_version=TERMS),
        ),
        201,
        api.UserRead,
    )
    promoted = parsed(
        api.call(
            "auth",
            "admin_update",
            admin,
            user_id=member.id,
            body=api.AdminUserUpdate(role=api.AdminUserUpdateRole.STAFF),
        ),
        200,
        api.UserRead,
    )
    assert promoted.role == api.UserReadRole.STAFF
    staff = parsed(
        api.call("auth", "login", body=api.LoginRequest(email=staff_email, password=PASSWORD)), 200, api.LoginResponse
    ).access_token

    # the catalogue: staff create a product and adjust its stock; a customer may not
    sku = f"SAVON-{uuid.uuid4().hex[:6]}"
    product = parsed(
        api.call(
            "products",
            "create_product",
            staff,
            body=api.ProductCreate(sku=sku, name="Savon noir", price_xaf=2500, initial_stock=3),
        ),
        201,
        api.ProductRead,
    )
    forbidden = api.call(
        "products", "create_product", customer, body=api.ProductCreate(sku=sku + "x", name="Savon", price_xaf=1)
    )
    assert parsed(forbidden, 403, api.Problem).status == 403
    stock = parsed(
        api.call(
            "products",
            "adjust_stock",
            staff,
            product_id=product.id,
            body=api.StockAdjustment(delta=2, reason="delivery from Douala"),
        ),
        200,
        api.StockRead,
    )
    assert (stock.on_hand, stock.reserved, stock.available) == (5, 0, 5)
    page = parsed(api.call("products", "list_products", q=sku), 200, api.PageProductRead)
    assert [item.id for item in page.items] == [product.id]
    assert parsed(api.call("products", "get_product", product_id=product.id), 200, api.ProductRead).available == 5

    # an order; the 409 with its typed short items; a 422 with its typed errors
    order = parsed(
        api.call(
            "orders",
            "place_order",
            customer,
            body=api.OrderCreate(items=[api.OrderLineIn(product_id=product.id, quantity=2)]),
            idempotency_key=str(uuid.uuid4()),
        ),
        201,
        api.OrderRead,
    )
    assert order.status == api.OrderReadStatus.PENDING
    assert order.total_xaf == 5000
    assert order.items[0].sku == sku
    short = parsed(
        api.call(
            "orders",
            "place_order",
            customer,
            body=api.OrderCreate(items=[api.OrderLineIn(product_id=product.id, quantity=100)]),
            idempotency_key=str(uuid.uuid4()),
        ),
        409,
        api.OrderConflictProblem,
    )
    assert [(s.product_id, s.requested, s.available, s.withdrawn) for s in short.short_items] == [
        (product.id, 100, 3, False)
    ]
    invalid = parsed(
        api.call(
            "orders",
            "place_order",
            customer,
            body=api.OrderCreate(items=[api.OrderLineIn(product_id=product.id, quantity=0)]),
            idempotency_key=str(uuid.uuid4()),
        ),
        422,
        api.ValidationProblem,
    )
    assert [error.loc for error in invalid.errors] == [["body", "items", 0, "quantity"]]

    # a 429 with its retry time
    reset = api.ResetRequest(email=email)
    for _ in range(RESETS_PER_HOUR):
        parsed(api.call("auth", "password_reset_request", body=reset), 202, api.Accepted)
    throttled = api.call("auth", "password_reset_request", body=reset)
    retry = parsed(throttled, 429, api.RetryProblem)
    assert 0 < retry.retry_after <= 3600
    assert int(throttled.headers["Retry-After"]) == retry.retry_after

    # cancelling the order gives its stock back
    cancelled = parsed(api.call("orders", "cancel_order", customer, order_id=order.id), 200, api.OrderRead)
    assert cancelled.status == api.OrderReadStatus.CANCELLED
    again = parsed(api.call("orders", "cancel_order", customer, order_id=order.id), 409, api.OrderTransitionProblem)
    assert (again.status, again.order_status, again.requested_status) == (409, "cancelled", "cancelled")
    stock = parsed(api.call("products", "get_stock", staff, product_id=product.id), 200, api.StockRead)
    assert (stock.on_hand, stock.reserved) == (5, 0)

    # an admin queries the audit log (events arrive through the services' outbox relays)
    def cancellation() -> Any:
        events = parsed(
            api.call("audit", "list_events", admin, action="orders.order.cancelled", resource_id=str(order.id)),
            200,
            api.PageEventRead,
        )
        return events.items

    events = eventually(cancellation, "the cancellation in the audit log")
    assert events[0].resource_id == str(order.id)
    assert parsed(api.call("audit", "list_events", customer), 403, api.Problem).status == 403
    verified = parsed(api.call("audit", "verify", admin), 200, api.VerifyResult)
    assert verified.ok is True


def test_a_second_factor_through_the_generated_client(system: RunningSystem, client_package: ModuleType) -> None:
    """The login's 401 that asks for a second factor is typed: its mfa_token reaches a typed client."""
    api = Api(client_package, system.url())
    email = f"mfa-{uuid.uuid4().hex[:8]}@boutique.cm"
    body = api.RegisterRequest(email=email, password=PASSWORD, accept_terms=True, terms_version=TERMS)
    parsed(api.call("auth", "register", body=body), 201, api.UserRead)
    credentials = api.LoginRequest(email=email, password=PASSWORD)
    access = parsed(api.call("auth", "login", body=credentials), 200, api.LoginResponse).access_token
    secret = parsed(api.call("auth", "mfa_enrol", access), 200, api.TotpEnrolment).secret
    codes = parsed(
        api.call("auth", "mfa_confirm", access, body=api.MfaConfirm(password=PASSWORD, code=pyotp.TOTP(secret).now())),
        200,
        api.RecoveryCodes,
    ).recovery_codes
    challenge = parsed(api.call("auth", "login", body=credentials), 401, api.MfaRequiredProblem)
    assert challenge.type_ == "urn:comptoir:problem:mfa-required"
    assert challenge.expires_in > 0
    assert {str(method) for method in challenge.methods} == {"totp", "recovery_code"}
    done = parsed(
        api.call("auth", "login_mfa", body=api.MfaLogin(mfa_token=challenge.mfa_token, code=codes[0])),
        200,
        api.MfaLoginResponse,
    )
    assert parsed(api.call("auth", "me", done.access_token), 200, api.UserRead).email == email
    # A wrong password is the same typed 401, without a challenge.
    wrong = api.LoginRequest(email=email, password=PASSWORD + "!")
    refused = parsed(api.call("auth", "login", body=wrong), 401, api.MfaRequiredProblem)
    assert (refused.type_, refused.mfa_token) == (
        "urn:comptoir:problem:invalid-credentials",
        importlib.import_module(PACKAGE + ".types").UNSET,
    )
