"""Catalogue rules."""

from __future__ import annotations

import uuid
from datetime import datetime

from common.errors import BadRequest
from common.pagination import Page, decode_cursor, encode_cursor
from services.inventory.errors import ProductNotFound
from services.inventory.repository import ProductRepository
from services.inventory.schemas import ProductRead


class CatalogueService:
    def __init__(self, products: ProductRepository) -> None:
        self.products = products

    async def list_products(
        self, *, limit: int, cursor: str | None, query: str | None, include_inactive: bool
    ) -> Page[ProductRead]:
        after = None
        if cursor:
            created, ident = decode_cursor(cursor, 2)
            try:
                after = (datetime.fromisoformat(created), uuid.UUID(ident))
            except ValueError as exc:
                raise BadRequest("The cursor is not valid.") from exc
        rows = await self.products.list(limit=limit + 1, include_inactive=include_inactive, query=query, after=after)
        page, more = rows[:limit], len(rows) > limit
        next_cursor = encode_cursor([page[-1].created_at.isoformat(), str(page[-1].id)]) if more else None
        return Page[ProductRead](items=[ProductRead.model_validate(p) for p in page], next_cursor=next_cursor)

    async def get_product(self, product_id: uuid.UUID, *, include_inactive: bool) -> ProductRead:
        product = await self.products.get(product_id)
        if product is None or (not product.is_active and not include_inactive):
            raise ProductNotFound()
        return ProductRead.model_validate(product)
