from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse

from common.audit import Actor
from common.conditional import if_none_match_names
from common.errors import Unprocessable, UnsupportedMediaType
from common.pagination import DEFAULT_LIMIT, CursorParam, LimitParam, Page
from common.security import OptionalUser, RequireStaff
from common.tokens import Claims
from services.inventory.deps import Catalogue, Images, Reader, State, Stock
from services.inventory.errors import ImageNotFound, ImageTooLarge
from services.inventory.etag import json_answer
from services.inventory.schemas import (
    SEARCH_PATTERN,
    ImageRead,
    MovementRead,
    ProductCreate,
    ProductRead,
    ProductUpdate,
    StockAdjustment,
    StockRead,
    check_printable,
)

router = APIRouter(prefix="/api/v1/products", tags=["products"])

# A price or stock change shows within a second at any cache that honours this (the gateway's included);
# the ETag lets a client revalidate for the price of a 304.
CATALOGUE_CACHE = "public, max-age=1"
IMAGE_CACHE = "public, max-age=86400"
SIGNED_IN = "private, no-cache"
PRIVATE = "no-store"


def _is_staff(claims: Claims | None) -> bool:
    return claims is not None and claims.has_role("staff")


def _cache_headers(claims: Claims | None, public: str) -> dict[str, str]:
    """Staff see inactive products: their answers are never stored. An answer to a signed-in request is never
    kept by a shared cache; only anonymous answers are public."""
    if claims is None:
        return {"Cache-Control": public, "Vary": "Authorization"}
    return {"Cache-Control": PRIVATE if _is_staff(claims) else SIGNED_IN, "Vary": "Authorization"}


def _query(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_printable(value, multiline=False)
    except ValueError as exc:
        raise Unprocessable("The search text must not contain control characters.", loc=("query", "q")) from exc


@router.get("", response_model=Page[ProductRead])
async def list_products(
    reader: Reader,
    request: Request,
    claims: OptionalUser,
    q: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=SEARCH_PATTERN,
            description="Matches sku or name, case-insensitively (no control characters).",
        ),
    ] = None,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Response:
    """List products, newest first: active ones for everyone, inactive ones too for staff."""
    body = await reader.page_json(limit=limit, cursor=cursor, query=_query(q), include_inactive=_is_staff(claims))
    return json_answer(request.scope, body, _cache_headers(claims, CATALOGUE_CACHE))


@router.post("", response_model=ProductRead, status_code=201, responses={409: {"description": "Duplicate sku"}})
async def create_product(
    data: ProductCreate, catalogue: Catalogue, request: Request, response: Response, claims: RequireStaff
) -> ProductRead:
    """Create a product (staff); `initial_stock` units are received into stock."""
    product = await catalogue.create_product(data, Actor.of(request, claims))
    response.headers["Location"] = f"/api/v1/products/{product.id}"
    return product


@router.get("/{product_id}", response_model=ProductRead)
async def get_product(product_id: uuid.UUID, reader: Reader, request: Request, claims: OptionalUser) -> Response:
    """One product (an inactive one only for staff)."""
    body = await reader.product_json(product_id, include_inactive=_is_staff(claims))
    return json_answer(request.scope, body, _cache_headers(claims, CATALOGUE_CACHE))


@router.patch("/{product_id}", response_model=ProductRead)
async def update_product(
    product_id: uuid.UUID, data: ProductUpdate, catalogue: Catalogue, request: Request, claims: RequireStaff
) -> ProductRead:
    """Change a product's name, description, price or visibility (staff)."""
    return await catalogue.update_product(product_id, data, Actor.of(request, claims))


@router.get("/{product_id}/stock", response_model=StockRead)
async def get_stock(product_id: uuid.UUID, stock: Stock, _staff: RequireStaff) -> StockRead:
    """On-hand, reserved and available units (staff)."""
    return await stock.stock(product_id)


@router.post(
    "/{product_id}/stock-adjustments",
    response_model=StockRead,
    responses={409: {"description": "On hand would drop below the reserved units"}},
)
async def adjust_stock(
    product_id: uuid.UUID, data: StockAdjustment, stock: Stock, request: Request, claims: RequireStaff
) -> StockRead:
    """Add or remove on-hand units with a reason (staff); recorded in the stock ledger and the audit trail."""
    return await stock.adjust(product_id, data, Actor.of(request, claims))


@router.get("/{product_id}/stock-movements", response_model=Page[MovementRead])
async def list_movements(
    product_id: uuid.UUID,
    stock: Stock,
    _staff: RequireStaff,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Page[MovementRead]:
    """The product's stock ledger, newest first (staff)."""
    return await stock.movements(product_id, limit=limit, cursor=cursor)


_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "minLength": 1}},
                    "additionalProperties": False,
                }
            }
        },
    }
}


async def _read_upload(request: Request, max_bytes: int) -> bytes:
    """The bytes of the one `file` part, refused past ``max_bytes`` (the body itself is bounded upstream)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("Send the image as multipart/form-data with a `file` part.")
    async with request.form(max_files=1, max_fields=4, max_part_size=4096) as form:
        upload = form.get("file")
        if any(name != "file" for name in form):
            raise Unprocessable("Only the `file` part is accepted.")  # errors: at ["body"], saying the same
        if not isinstance(upload, UploadFile):
            raise Unprocessable(
                "The `file` part is missing.", extra={"errors": [{"loc": ["body", "file"], "msg": "Field required"}]}
            )
        data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"An image may be at most {max_bytes} bytes.")
    if not data:
        raise Unprocessable("The file is empty.", loc=("body", "file"))
    return data


@router.post(
    "/{product_id}/images",
    response_model=ImageRead,
    status_code=201,
    openapi_extra=_UPLOAD_SCHEMA,
    responses={
        413: {"description": "Larger than 5 MiB"},
        415: {"description": "Not a JPEG, PNG or WebP image"},
        422: {"description": "Damaged, too many pixels, animated, or carrying a payload (polyglot)"},
    },
)
async def upload_image(
    product_id: uuid.UUID, request: Request, response: Response, images: Images, state: State, claims: RequireStaff
) -> ImageRead:
    """Add an image (staff): checked, decoded and re-encoded; metadata and anything around the pixels is dropped.

    Only the signature of the bytes decides the type; the client's file name and content type are ignored.
    """
    data = await _read_upload(request, state.settings.image_max_bytes)
    image = await images.add(product_id, data, Actor.of(request, claims))
    response.headers["Location"] = image.url
    return image


@router.get(
    "/{product_id}/images/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}},
)
async def get_image(
    product_id: uuid.UUID, image_id: uuid.UUID, request: Request, images: Images, claims: OptionalUser
) -> Response:
    """The image bytes, with their real content type; 304 without them when If-None-Match names the ETag.

    Client generators that know only JSON and `application/octet-stream` answers need to be told that these
    types are bytes (openapi-python-client: `content_type_overrides` mapping `image/jpeg`, `image/png` and
    `image/webp` to `application/octet-stream`); otherwise their generated call drops the 200's body."""
    image = await images.locate(product_id, image_id, include_inactive=_is_staff(claims))
    path = images.store.path_of(image.storage_key)
    headers = {
        "Cache-Control": PRIVATE if _is_staff(claims) else IMAGE_CACHE,
        "ETag": f'"{image.sha256}"',
        # Shop web apps on other origins embed product pictures; everything else stays same-origin.
        "Cross-Origin-Resource-Policy": "cross-origin",
        "Content-Disposition": f'inline; filename="{image.id}.{path.suffix.lstrip(".")}"',
        "Vary": "Authorization",
    }
    if not path.is_file():
        raise ImageNotFound()
    if if_none_match_names(request.scope, headers["ETag"].encode("ascii")):
        kept = {name: headers[name] for name in ("Cache-Control", "ETag", "Vary")}  # RFC 9110 §15.4.5
        return Response(status_code=304, headers=kept)
    return FileResponse(path, media_type=image.content_type, headers=headers)
