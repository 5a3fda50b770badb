"""The inventory service's reservation endpoints, as orders sees them.

Every call is idempotent by reservation id, so transport failures, timeouts and 502/503/504 answers are
retried a few times with a short backoff; what still fails is ``InventoryUnavailable`` (a 503 for our
client). A 401 drops the cached service token once and retries (rotated keys).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from common.errors import ServiceUnavailable
from common.http import Answer, Transport, TransportError, forward_headers
from services.orders.errors import InventoryUnavailable
from services.orders.schemas import OrderLineIn, Reservation, ShortLine

log = structlog.get_logger("comptoir.orders.inventory")

RETRYABLE_STATUS = frozenset({502, 503, 504})


class TokenSource(Protocol):
    async def headers_for(self, audience: str) -> dict[str, str]: ...

    def forget(self, audience: str) -> None: ...


class Rejected(Exception):
    """Some items lack stock; nothing is held."""

    def __init__(self, short: list[ShortLine]) -> None:
        super().__init__("insufficient stock")
        self.short = short


class UnknownProducts(Exception):
    def __init__(self, product_ids: list[str]) -> None:
        super().__init__("unknown products")
        self.product_ids = product_ids


class Closed(Exception):
    """The reservation is no longer held (expired, released or fenced)."""

    def __init__(self, status: str | None) -> None:
        super().__init__(f"reservation {status}")
        self.status = status


class InventoryClient:
    def __init__(
        self,
        client: Transport,
        tokens: Callable[[], TokenSource],
        *,
        attempts: int = 3,
        backoff_seconds: float = 0.1,
    ) -> None:
        self.client = client
        self.tokens = tokens  # read at call time: the token source may be replaced after start-up
        self.attempts = attempts
        self.backoff = backoff_seconds

    async def _call(self, method: str, path: str, *, json: Any = None, request_id: str | None) -> Answer:
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                headers = await self.tokens().headers_for("inventory") | forward_headers(request_id)
            except ServiceUnavailable as exc:  # no service token: the auth service is unreachable
                raise InventoryUnavailable("Inventory cannot be reached right now; retry shortly.") from exc
            try:
                response = await self.client.request(method, path, json=json, headers=headers)
            except TransportError as exc:
                log.warning("orders.inventory.unreachable", path=path, attempt=attempt, error=str(exc))
                response = None
            if response is not None and response.status == 401 and not refreshed:
                refreshed = True
                self.tokens().forget("inventory")
                attempt -= 1
                continue
            if response is not None and response.status not in RETRYABLE_STATUS:
                if response.status >= 500 or response.status in (401, 403):
                    log.error("orders.inventory.refused", path=path, status=response.status)
                    raise InventoryUnavailable("Inventory refused the request.")
                return response
            if attempt >= self.attempts:
                raise InventoryUnavailable("Inventory is unavailable; try again shortly.", headers={"Retry-After": "2"})
            await asyncio.sleep(self.backoff * 2 ** (attempt - 1))

    @staticmethod
    def _reservation(response: Answer) -> Reservation:
        try:
            return Reservation.model_validate_json(response.body)
        except (ValueError, ValidationError) as exc:
            log.error("orders.inventory.bad_answer", status=response.status)
            raise InventoryUnavailable("Inventory gave an answer orders cannot use.") from exc

    async def reserve(
        self, reservation_id: uuid.UUID, items: Sequence[OrderLineIn], *, request_id: str | None = None
    ) -> Reservation:
        body = {"items": [{"product_id": str(i.product_id), "quantity": i.quantity} for i in items]}
        response = await self._call("PUT", f"/internal/reservations/{reservation_id}", json=body, request_id=request_id)
        if response.status in (200, 201):
            return self._reservation(response)
        problem = _problem(response)
        if response.status == 409 and "short_items" in problem:
            return_short = [ShortLine.model_validate(s) for s in problem["short_items"]]
            raise Rejected(return_short)
        if response.status == 409:
            raise Closed(problem.get("reservation_status"))
        if response.status == 422 and "product_ids" in problem:
            raise UnknownProducts([str(p) for p in problem["product_ids"]])
        log.error("orders.inventory.unexpected", status=response.status, path="reserve")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.")

    async def commit(self, reservation_id: uuid.UUID, *, request_id: str | None = None) -> Reservation:
        response = await self._call("POST", f"/internal/reservations/{reservation_id}/commit", request_id=request_id)
        if response.status == 200:
            return self._reservation(response)
        if response.status in (404, 409):
            raise Closed(_problem(response).get("reservation_status"))
        log.error("orders.inventory.unexpected", status=response.status, path="commit")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.")

    async def release(self, reservation_id: uuid.UUID, *, request_id: str | None = None) -> Reservation:
        response = await self._call("POST", f"/internal/reservations/{reservation_id}/release", request_id=request_id)
        if response.status == 200:
            return self._reservation(response)
        log.error("orders.inventory.unexpected", status=response.status, path="release")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.")


def _problem(response: Answer) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
