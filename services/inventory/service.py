"""Catalogue, stock and image rules."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import uuid
from pathlib import Path
from typing import Any, cast

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from common.audit import Actor, changes, record
from common.db import Database
from common.errors import Unprocessable
from common.pagination import Page, encode_cursor, number_before, page_of, time_key_after
from services.inventory import images
from services.inventory.errors import (
    DuplicateSku,
    ImageNotFound,
    ImageStorageUnavailable,
    ProductNotFound,
    StockBelowReserved,
    TooManyImages,
)
from services.inventory.models import MAX_STOCK, MovementKind, Product, ProductImage, StockMovement, outbox
from services.inventory.repository import CatalogueStatements, ProductRepository
from services.inventory.schemas import (
    PRODUCT_JSON,
    PRODUCT_PAGE_JSON,
    ImageRead,
    MovementRead,
    ProductCreate,
    ProductFields,
    ProductRead,
    ProductUpdate,
    StockAdjustment,
    StockRead,
)

SERVICE = "inventory"
_STORAGE_KEY = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp)$")

log = structlog.get_logger("comptoir.inventory")


async def set_lock_timeout(session: AsyncSession, milliseconds: int) -> None:
    """Stock changes wait this long for a row lock, then fail with 503 instead of queueing forever."""
    await session.execute(text(f"SET LOCAL lock_timeout = '{int(milliseconds)}ms'"))


def _product_values(product: Product) -> dict[str, Any]:
    return {
        "name": product.name,
        "description": product.description,
        "price_xaf": product.price_xaf,
        "is_active": product.is_active,
    }


class CatalogueReader:
    """The catalogue as clients read it: each answer's JSON bytes, built once from one statement's rows.

    No ORM objects and no models per product: the rows are serialized as ``ProductFields`` by the same pydantic
    core as ``ProductRead``, and the one statement runs outside a transaction (no BEGIN, no COMMIT).
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def page_json(self, *, limit: int, cursor: str | None, query: str | None, include_inactive: bool) -> bytes:
        """A ``Page[ProductRead]``, newest first."""
        after = time_key_after(cursor)
        async with self.db.autocommit() as driver:
            rows = await CatalogueStatements(driver).page(
                limit=limit + 1, include_inactive=include_inactive, query=query, after=after
            )
        items = [cast(ProductFields, dict(row)) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit and items:
            last = items[-1]
            next_cursor = encode_cursor([last["created_at"].isoformat(), str(last["id"])])
        return PRODUCT_PAGE_JSON.dump_json({"items": items, "next_cursor": next_cursor})

    async def product_json(self, product_id: uuid.UUID, *, include_inactive: bool) -> bytes:
        """One ``ProductRead`` (an inactive product is not found unless ``include_inactive``)."""
        async with self.db.autocommit() as driver:
            row = await CatalogueStatements(driver).product(product_id)
        if row is None or (not row["is_active"] and not include_inactive):
            raise ProductNotFound()
        return PRODUCT_JSON.dump_json(cast(ProductFields, dict(row)))


class CatalogueService:
    def __init__(self, products: ProductRepository) -> None:
        self.products = products

    @property
    def session(self) -> AsyncSession:
        return self.products.session

    async def create_product(self, data: ProductCreate, actor: Actor) -> ProductRead:
        product_id = await self.products.insert(
            {
                "id": uuid.uuid4(),
                "sku": data.sku,
                "name": data.name,
                "description": data.description,
                "price_xaf": data.price_xaf,
                "is_active": True,
                "on_hand": data.initial_stock,
                "reserved": 0,
            }
        )
        if product_id is None:
            raise DuplicateSku(f"The sku {data.sku!r} is already in use.")
        if data.initial_stock:
            await self.products.add_movements(
                [
                    StockMovement(
                        product_id=product_id,
                        kind=MovementKind.receive,
                        delta_on_hand=data.initial_stock,
                        delta_reserved=0,
                        reason="initial stock",
                        actor_id=actor.id,
                    )
                ]
            )
        product = await self.products.reread(product_id)
        await record(
            self.session,
            outbox,
            actor.event(
                SERVICE,
                "inventory.product.created",
                resource_type="product",
                resource_id=str(product_id),
                new={"sku": product.sku, **_product_values(product), "initial_stock": data.initial_stock},
            ),
        )
        return ProductRead.model_validate(product)

    async def update_product(self, product_id: uuid.UUID, data: ProductUpdate, actor: Actor) -> ProductRead:
        product = await self.products.lock(product_id)
        if product is None:
            raise ProductNotFound()
        before = _product_values(product)
        for name, value in data.model_dump(exclude_unset=True).items():
            setattr(product, name, value)
        old, new = changes(before, _product_values(product))
        if new:
            await self.session.flush()
            await record(
                self.session,
                outbox,
                actor.event(
                    SERVICE,
                    "inventory.product.updated",
                    resource_type="product",
                    resource_id=str(product_id),
                    old=old,
                    new=new,
                ),
            )
        refreshed = await self.products.reread(product_id)
        return ProductRead.model_validate(refreshed)


def stock_of(product: Product) -> StockRead:
    return StockRead(
        product_id=product.id, on_hand=product.on_hand, reserved=product.reserved, available=product.available
    )


class StockService:
    def __init__(self, products: ProductRepository, *, lock_timeout_ms: int) -> None:
        self.products = products
        self.lock_timeout_ms = lock_timeout_ms

    async def stock(self, product_id: uuid.UUID) -> StockRead:
        product = await self.products.get(product_id)
        if product is None:
            raise ProductNotFound()
        return stock_of(product)

    async def adjust(self, product_id: uuid.UUID, data: StockAdjustment, actor: Actor) -> StockRead:
        session = self.products.session
        await set_lock_timeout(session, self.lock_timeout_ms)
        product = await self.products.lock(product_id)
        if product is None:
            raise ProductNotFound()
        on_hand = product.on_hand + data.delta
        if on_hand < product.reserved:
            raise StockBelowReserved(
                f"On hand would be {on_hand} but {product.reserved} units are reserved.",
                extra={"on_hand": product.on_hand, "reserved": product.reserved, "available": product.available},
            )
        if on_hand > MAX_STOCK:
            raise Unprocessable(f"On hand stock cannot exceed {MAX_STOCK} units.", loc=("body", "delta"))
        old_on_hand = product.on_hand
        product.on_hand = on_hand
        await self.products.add_movements(
            [
                StockMovement(
                    product_id=product_id,
                    kind=MovementKind.adjust,
                    delta_on_hand=data.delta,
                    delta_reserved=0,
                    reason=data.reason,
                    actor_id=actor.id,
                )
            ]
        )
        await record(
            session,
            outbox,
            actor.event(
                SERVICE,
                "inventory.stock.adjusted",
                resource_type="product",
                resource_id=str(product_id),
                old={"on_hand": old_on_hand},
                new={"on_hand": on_hand, "delta": data.delta, "reason": data.reason},
            ),
        )
        return stock_of(product)

    async def movements(self, product_id: uuid.UUID, *, limit: int, cursor: str | None) -> Page[MovementRead]:
        if await self.products.get(product_id) is None:
            raise ProductNotFound()
        rows = await self.products.movements(product_id, limit=limit + 1, before=number_before(cursor))
        return page_of(rows, limit, MovementRead.model_validate, lambda m: [str(m.id)])


class ImageStore:
    """Re-encoded images on disk under random names; the directory is never served as such."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, storage_key: str) -> Path:
        if not _STORAGE_KEY.match(storage_key):
            raise ImageNotFound()
        return self.directory / storage_key

    def write(self, data: bytes, extension: str) -> str:
        images.make_directory(self.directory)
        key = f"{secrets.token_hex(16)}.{extension}"
        final = self.directory / key
        temporary = self.directory / f".{key}.part"
        fd = images.create_file(temporary)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return key

    def delete(self, storage_key: str) -> None:
        self.path_of(storage_key).unlink(missing_ok=True)


class ImageService:
    def __init__(
        self,
        products: ProductRepository,
        store: ImageStore,
        *,
        max_pixels: int,
        max_images: int,
        decode_slots: asyncio.Semaphore,
    ) -> None:
        self.products = products
        self.store = store
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.decode_slots = decode_slots

    async def add(self, product_id: uuid.UUID, data: bytes, actor: Actor) -> ImageRead:
        if await self.products.get(product_id) is None:
            raise ProductNotFound()
        # Decoding takes CPU and memory: a few at a time, off the event loop, and before any row is locked.
        async with self.decode_slots:
            clean = await asyncio.to_thread(images.process, data, max_pixels=self.max_pixels)
        session = self.products.session
        if await self.products.lock(product_id) is None:
            raise ProductNotFound()
        if await self.products.count_images(product_id) >= self.max_images:
            raise TooManyImages(f"A product has at most {self.max_images} images.")
        try:
            key = await asyncio.to_thread(self.store.write, clean.data, clean.format.extension)
        except OSError as exc:  # a full or read-only DATA_DIR/uploads: the operator's to fix, not a 500
            log.error("inventory.images.storage_failed", error=type(exc).__name__, errno=exc.errno)
            raise ImageStorageUnavailable() from exc
        image = ProductImage(
            id=uuid.uuid4(),
            product_id=product_id,
            storage_key=key,
            content_type=clean.format.content_type,
            size=len(clean.data),
            width=clean.width,
            height=clean.height,
            sha256=clean.sha256,
        )
        try:
            session.add(image)
            await session.flush()
            await record(
                session,
                outbox,
                actor.event(
                    SERVICE,
                    "inventory.product.image_added",
                    resource_type="product",
                    resource_id=str(product_id),
                    new={
                        "image_id": str(image.id),
                        "content_type": image.content_type,
                        "size": image.size,
                        "sha256": image.sha256,
                    },
                ),
            )
            # Committed here, not when the request ends: a transaction that fails at COMMIT must take the
            # file with it.
            await session.commit()
        except BaseException:
            self.store.delete(key)
            raise
        return ImageRead(
            id=image.id,
            url=image.url,
            content_type=image.content_type,
            size=image.size,
            width=image.width,
            height=image.height,
        )

    async def locate(self, product_id: uuid.UUID, image_id: uuid.UUID, *, include_inactive: bool) -> ProductImage:
        product = await self.products.get(product_id)
        if product is None or (not product.is_active and not include_inactive):
            raise ImageNotFound()
        image = await self.products.image(product_id, image_id)
        if image is None:
            raise ImageNotFound()
        return image
