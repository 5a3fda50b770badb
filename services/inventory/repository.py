"""Queries only: flush, never commit."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory.models import Product


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ProductRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, product_id: uuid.UUID) -> Product | None:
        return await self.session.get(Product, product_id)

    async def list(
        self,
        *,
        limit: int,
        include_inactive: bool,
        query: str | None,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[Product]:
        """Newest first, keyset-paginated on (created_at, id)."""
        stmt = select(Product)
        if not include_inactive:
            stmt = stmt.where(Product.is_active.is_(True))
        if query:
            pattern = f"%{_escape_like(query.lower())}%"
            stmt = stmt.where(
                or_(
                    func.lower(Product.sku).like(pattern, escape="\\"),
                    func.lower(Product.name).like(pattern, escape="\\"),
                )
            )
        if after is not None:
            stmt = stmt.where(tuple_(Product.created_at, Product.id) < tuple_(*after))
        stmt = stmt.order_by(Product.created_at.desc(), Product.id.desc()).limit(limit)
        return list((await self.session.scalars(stmt)).all())
