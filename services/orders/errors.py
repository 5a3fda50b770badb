from common.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable


class OrderNotFound(NotFound):
    slug = "order-not-found"
    title = "Order not found"


class IdempotencyKeyMissing(BadRequest):
    slug = "idempotency-key-required"
    title = "Idempotency-Key header required"


class IdempotencyKeyReused(Unprocessable):
    slug = "idempotency-key-reused"
    title = "This Idempotency-Key was used with another request body"
    loc = ("header", "Idempotency-Key")


class IdempotentRequestInProgress(Conflict):
    slug = "idempotent-request-in-progress"
    title = "A request with this Idempotency-Key is still being processed"


class InsufficientStock(Conflict):
    slug = "insufficient-stock"
    title = "Not enough stock"


class UnknownProducts(Unprocessable):
    slug = "unknown-products"
    title = "Unknown products"


class TransitionNotAllowed(Conflict):
    slug = "transition-not-allowed"
    title = "The order's status does not allow this"


class OrderExpired(Conflict):
    slug = "order-expired"
    title = "The order expired"


class OrderBusy(Conflict):
    slug = "order-busy"
    title = "The order is being changed by another request"


class OrderTotalTooLarge(Unprocessable):
    slug = "order-total-too-large"
    title = "The order total is too large"
    loc = ("body", "items")


class InventoryUnavailable(ServiceUnavailable):
    slug = "inventory-unavailable"
    title = "Inventory is unavailable"


class DatabaseBusy(ServiceUnavailable):
    slug = "database-busy"
    title = "The order could not be recorded right now"
