from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from common.db import SessionDep
from common.pagination import DEFAULT_LIMIT, CursorParam, LimitParam, Page
from services.inventory.repository import ProductRepository
from services.inventory.schemas import ProductRead
from services.inventory.service import CatalogueService

router = APIRouter(prefix="/api/v1/products", tags=["products"])

CATALOGUE_CACHE = "public, max-age=30"


@router.get("", response_model=Page[ProductRead])
async def list_products(
    session: SessionDep,
    response: Response,
    q: Annotated[str | None, Query(max_length=100, description="Matches sku or name, case-insensitively.")] = None,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Page[ProductRead]:
    """List active products, newest first."""
    response.headers["Cache-Control"] = CATALOGUE_CACHE
    service = CatalogueService(ProductRepository(session))
    return await service.list_products(limit=limit, cursor=cursor, query=q, include_inactive=False)


@router.get("/{product_id}", response_model=ProductRead)
async def get_product(product_id: uuid.UUID, session: SessionDep, response: Response) -> ProductRead:
    """One product."""
    response.headers["Cache-Control"] = CATALOGUE_CACHE
    return await CatalogueService(ProductRepository(session)).get_product(product_id, include_inactive=False)
