from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ORDERS_")  # the rest comes from CommonSettings

    # Where the inventory service answers its /internal/reservations endpoints.
    inventory_url: str = "http://127.0.0.1:8002"
    inventory_timeout_seconds: float = Field(5.0, gt=0, le=60)
    inventory_connect_timeout_seconds: float = Field(2.0, gt=0, le=30)
    # Reservation calls are idempotent, so a failed one is retried this many times in all.
    inventory_attempts: int = Field(3, ge=1, le=10)
    # Every try of one call to inventory together: past it the order gets 503 (no order placed), so that
    # a hung inventory is answered before the gateway's deadline (GATEWAY_UPSTREAM_DEADLINE_SECONDS, 15 s)
    # and never as a 504 that counts against orders itself.
    inventory_budget_seconds: float = Field(10.0, gt=0, le=120)
    # Reserves that arrive while this many calls to inventory are out wait, and go out together in the
    # next call (at most this many in one call): a hot product's row is locked once per batch.
    reserve_batches_in_flight: int = Field(2, ge=1, le=64)
    reserve_batch_size: int = Field(100, ge=1, le=100)
    # Likewise for the statements that claim idempotency keys and record placed orders: the orders that
    # arrive while this many of each are out go in the next one.
    statement_batches_in_flight: int = Field(2, ge=1, le=16)
    # A retried POST /orders waits this long for the first attempt with the same key to finish, then gets
    # 409 with Retry-After; below the gateway's deadline, so that the wait is never a 504.
    idempotency_wait_seconds: float = Field(10.0, gt=0, le=120)
    # An order still being placed after this long was orphaned (a crash): its hold is released.
    placing_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    # A confirmation whose inventory call has not finished after this long is driven by the sweeper.
    stale_action_seconds: float = Field(60.0, gt=0, le=3600)
    # How often the sweeper expires pending orders and reconciles interrupted ones.
    sweep_interval_seconds: float = Field(10.0, gt=0, le=3600)
