from common.errors import Conflict, Forbidden, NotFound, ServiceUnavailable, Unprocessable


class ForeignEvent(Forbidden):
    slug = "foreign-event"
    title = "A caller may only submit its own events"


class BatchTooLarge(Unprocessable):
    slug = "batch-too-large"
    title = "Too many events in one batch"
    loc = ("body", "events")


class InvalidEvent(Unprocessable):
    slug = "invalid-event"
    title = "An event cannot be stored"
    loc = ("body", "events")


class ChainBusy(ServiceUnavailable):
    slug = "chain-busy"
    title = "The audit chain is busy"


class EmptyChain(Conflict):
    slug = "empty-chain"
    title = "There are no events to checkpoint yet"


class ChainBroken(Conflict):
    slug = "chain-broken"
    title = "The chain does not verify; it will not be signed"


class AlertNotFound(NotFound):
    slug = "alert-not-found"
    title = "Alert not found"


class NothingHeld(NotFound):
    slug = "nothing-held"
    title = "No audit events refer to this user"
