"""The inventory service's reservation endpoints, as orders sees them.

Every call is idempotent by reservation id, so transport failures, timeouts and 502/503/504 answers are
retried a few times with a short backoff; what still fails is ``InventoryUnavailable`` (a 503 for our
client). A 401 drops the cached service token once and retries (rotated keys).

Reserves are batched: a reserve that arrives while ``batches_in_flight`` calls are already out waits for
one of them to come back, and then goes out with every other reserve that arrived meanwhile, in one call
to inventory's batch endpoint (one transaction there, which locks a hot product's row once for the lot).
At low load a reserve goes out at once, alone; under load the batches grow with the load. No timer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from common.errors import ServiceUnavailable
from common.http import Answer, Transport, TransportError, forward_headers
from common.retries import retried
from services.orders.batching import Batcher
from services.orders.errors import InventoryUnavailable
from services.orders.metrics import BATCH_SIZE
from services.orders.schemas import OrderLineIn, Reservation, ShortLine

log = structlog.get_logger("comptoir.orders.inventory")

RETRYABLE_STATUS = frozenset({502, 503, 504})
# Order lines in one batch call at most (~70 bytes each): far below inventory's request body limit.
MAX_LINES_PER_CALL = 2000


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


class _Retryable(Exception):
    """Inventory could not be reached, or answered 502/503/504: worth another try."""


@dataclass
class _Call:
    method: str
    path: str
    json: Any
    request_id: str | None
    refreshed: bool = False  # the service token was dropped once after a 401
    attempt: int = 0


@dataclass(frozen=True)
class _Reserve:
    reservation_id: uuid.UUID
    items: list[dict[str, Any]]
    request_id: str | None


def _unavailable(_exc: BaseException) -> Exception:
    return InventoryUnavailable("Inventory is unavailable; try again shortly.", headers={"Retry-After": "2"})


class InventoryClient:
    def __init__(
        self,
        client: Transport,
        tokens: Callable[[], TokenSource],
        *,
        attempts: int = 3,
        budget_seconds: float = 10.0,
        backoff_seconds: float = 0.1,
        batch_size: int = 100,
        batches_in_flight: int = 2,
    ) -> None:
        self.client = client
        self.tokens = tokens  # read at call time: the token source may be replaced after start-up
        self.attempts = attempts
        self.budget = budget_seconds
        self.backoff = backoff_seconds
        self.reserves: Batcher[_Reserve, tuple[int, dict[str, Any]]] = Batcher(
            self._reserve_batch,
            failure=_unavailable,
            size=batch_size,
            in_flight=batches_in_flight,
            weigh=lambda reserve: len(reserve.items),
            max_weight=MAX_LINES_PER_CALL,
            observe=BATCH_SIZE.labels("reserve").observe,
        )

    async def _call(self, method: str, path: str, *, json: Any = None, request_id: str | None) -> Answer:
        call = _Call(method, path, json, request_id)
        try:
            async with asyncio.timeout(self.budget):
                return await retried(
                    lambda: self._try(call), _Retryable, attempts=self.attempts, first_wait=self.backoff
                )
        except (TimeoutError, _Retryable) as exc:
            if isinstance(exc, TimeoutError):
                log.warning("orders.inventory.out_of_time", path=path, attempts=call.attempt, budget=self.budget)
            raise _unavailable(exc) from None

    async def _try(self, call: _Call) -> Answer:
        call.attempt += 1
        response = await self._send(call)
        if response is not None and response.status == 401 and not call.refreshed:
            call.refreshed = True  # keys rotated: fetch a new service token, within the same attempt
            self.tokens().forget("inventory")
            response = await self._send(call)
        if response is None or response.status in RETRYABLE_STATUS:
            raise _Retryable()
        if response.status >= 500 or response.status in (401, 403):
            log.error("orders.inventory.refused", path=call.path, status=response.status)
            raise InventoryUnavailable("Inventory refused the request.")
        return response

    async def _send(self, call: _Call) -> Answer | None:
        """Inventory's answer, or None when it could not be reached."""
        try:
            headers = await self.tokens().headers_for("inventory") | forward_headers(call.request_id)
        except ServiceUnavailable as exc:  # no service token: the auth service is unreachable
            raise InventoryUnavailable("Inventory cannot be reached right now; retry shortly.") from exc
        try:
            return await self.client.request(call.method, call.path, json=call.json, headers=headers)
        except TransportError as exc:
            log.warning("orders.inventory.unreachable", path=call.path, attempt=call.attempt, error=str(exc))
            return None

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
        asked = [{"product_id": str(i.product_id), "quantity": i.quantity} for i in items]
        status, body = await self.reserves.submit(_Reserve(reservation_id, asked, request_id))
        return _reserved(status, body)

    async def _reserve_batch(self, batch: list[_Reserve]) -> list[tuple[int, dict[str, Any]]]:
        body = {"reservations": [{"reservation_id": str(r.reservation_id), "items": r.items} for r in batch]}
        # A lone reserve carries its request's id to inventory's logs; a batch is a request of its own.
        request_id = batch[0].request_id if len(batch) == 1 else None
        response = await self._call("POST", "/internal/reservations/batch", json=body, request_id=request_id)
        return _batch_results(response, [r.reservation_id for r in batch])

    async def close(self) -> None:
        """Stop the reserve calls in flight (at shutdown); what waits on them gets ``InventoryUnavailable``."""
        await self.reserves.close()

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


def _batch_results(response: Answer, asked: list[uuid.UUID]) -> list[tuple[int, dict[str, Any]]]:
    """Each reservation's (status, body), in the order asked; a batch answer that does not match what was
    asked is unusable as a whole."""
    if response.status != 200:
        log.error("orders.inventory.unexpected", status=response.status, path="reserve")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.")
    try:
        results = response.json()["results"]
        out = [(int(r["status"]), dict(r["body"])) for r in results]
        ids = [uuid.UUID(r["reservation_id"]) for r in results]
    except (ValueError, TypeError, KeyError) as exc:
        log.error("orders.inventory.bad_answer", path="reserve")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.") from exc
    if ids != asked:
        log.error("orders.inventory.bad_answer", path="reserve")
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.")
    return out


def _reserved(status: int, body: dict[str, Any]) -> Reservation:
    """One reservation's result, as the single reserve call would have answered it."""
    if status in (200, 201):
        try:
            return Reservation.model_validate(body)
        except ValidationError as exc:
            log.error("orders.inventory.bad_answer", status=status)
            raise InventoryUnavailable("Inventory gave an answer orders cannot use.") from exc
    try:
        if status == 409 and "short_items" in body:
            raise Rejected([ShortLine.model_validate(s) for s in body["short_items"]])
        if status == 409:
            raise Closed(body.get("reservation_status"))
        if status == 422 and "product_ids" in body:
            raise UnknownProducts([str(p) for p in body["product_ids"]])
    except (ValidationError, TypeError) as exc:
        log.error("orders.inventory.bad_answer", status=status)
        raise InventoryUnavailable("Inventory gave an answer orders cannot use.") from exc
    log.error("orders.inventory.unexpected", status=status, path="reserve")
    raise InventoryUnavailable("Inventory gave an answer orders cannot use.")


def _problem(response: Answer) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
