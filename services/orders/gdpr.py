"""Personal data, for the auth service's GDPR export and erasure of a user."""

from __future__ import annotations

import uuid
from dataclasses import replace

from common.audit import Actor, record
from common.clock import Clock
from common.db import Database
from services.orders.models import outbox
from services.orders.repository import OrderRepository
from services.orders.rules import SERVICE, read_of
from services.orders.schemas import UserErasure, UserOrdersExport


class PersonalData:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def export(self, user_id: uuid.UUID) -> UserOrdersExport:
        """Every visible order of the user, newest first, with its lines."""
        async with self.db.sessionmaker() as session, session.begin():
            orders = await OrderRepository(session).page(owner=user_id, status=None, after=None, limit=10**6)
            return UserOrdersExport(user_id=user_id, orders=[read_of(o) for o in orders])

    async def erase(self, user_id: uuid.UUID, actor: Actor) -> UserErasure:
        """Orders stay (bookkeeping) but no longer point at the person: a random pseudonym replaces the user id."""
        pseudonym = uuid.uuid4()
        async with self.db.sessionmaker() as session, session.begin():
            count = await OrderRepository(session).pseudonymise(user_id, pseudonym, self.clock())
            if count:
                # The request path names the user; the event must not undo the erasure it records.
                anonymous_path = replace(actor, context=actor.context | {"path": "/internal/users/{user_id}/erase"})
                event = anonymous_path.event(
                    SERVICE,
                    "orders.user.anonymised",
                    resource_type="customer",
                    resource_id=str(pseudonym),
                    new={"orders_anonymised": count},
                )
                await record(session, outbox, event)
        return UserErasure(orders_anonymised=count)
