"""Image uploads: only real JPEG/PNG/WebP, bounded in bytes and pixels, re-encoded, stored under random names."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import DatabaseFixture, assert_problem
from tests.inventory.support import Tokens, create_product

MiB = 1024 * 1024


def picture(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (x % 256, 90, 160))
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "EvilCam"  # Make
    exif[0x0110] = "Model-With-Serial-123456"  # Model
    exif[0x0131] = "editor"  # Software
    return picture("JPEG", exif=exif.tobytes())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width`` x ``height`` black pixels: tiny on disk, huge in memory."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zip_payload() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("evil.html", "<html><script>alert(document.cookie)</script></html>")
    return out.getvalue()


def files(data: bytes, filename: str = "photo.jpg", content_type: str = "image/jpeg") -> dict[str, tuple]:
    return {"file": (filename, data, content_type)}


def upload_url(product: dict) -> str:
    return f"/api/v1/products/{product['id']}/images"


@pytest.fixture
async def product(client: httpx.AsyncClient, tokens: Tokens) -> dict:
    return await create_product(client, tokens, stock=1)


def stored_files(client: httpx.AsyncClient) -> list[Path]:
    directory: Path = client.app.state.inventory.images.directory  # type: ignore[attr-defined]
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
async def test_upload_and_serve_each_format(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, fmt: str, content_type: str
) -> None:
    data = picture(fmt)
    response = await client.post(
        upload_url(product), files=files(data, f"x.{fmt.lower()}", "application/octet-stream"), headers=tokens.staff()
    )
    assert response.status_code == 201, response.text
    image = response.json()
    assert image["content_type"] == content_type
    assert (image["width"], image["height"]) == (64, 48)
    assert image["url"] == f"/api/v1/products/{product['id']}/images/{image['id']}"

    served = await client.get(image["url"])
    assert served.status_code == 200
    assert served.headers["content-type"] == content_type
    assert served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["cache-control"] == "public, max-age=86400"
    assert served.headers["cross-origin-resource-policy"] == "cross-origin"  # embeddable by shop front-ends
    assert served.headers["content-security-policy"].startswith("default-src 'none'")
    assert len(served.content) == image["size"]
    assert Image.open(io.BytesIO(served.content)).format == fmt
    listed = (await client.get(f"/api/v1/products/{product['id']}")).json()
    assert listed["image_urls"] == [image["url"]]
    # Revalidation, as the API reference documents it for images: 304 with the validator and no body.
    again = await client.get(image["url"], headers={"If-None-Match": served.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["etag"] == served.headers["etag"]
    assert again.headers["cache-control"] == "public, max-age=86400"


async def test_exif_and_metadata_are_dropped(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    original = jpeg_with_exif()
    assert b"EvilCam" in original
    assert Image.open(io.BytesIO(original)).getexif()
    response = await client.post(upload_url(product), files=files(original), headers=tokens.staff())
    assert response.status_code == 201, response.text
    served = (await client.get(response.json()["url"])).content
    assert b"EvilCam" not in served
    assert b"Exif" not in served
    assert not Image.open(io.BytesIO(served)).getexif()


async def test_png_text_chunks_are_dropped(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Author", "Jean Secret, +237 6 99 99 99 99")
    response = await client.post(
        upload_url(product), files=files(picture("PNG", pnginfo=info), "a.png", "image/png"), headers=tokens.staff()
    )
    served = (await client.get(response.json()["url"])).content
    assert b"Jean Secret" not in served


async def test_client_file_names_are_never_used(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, tmp_path: Path
) -> None:
    for name in ("../../../../tmp/pwned.jpg", "..\\..\\evil.jpg", "/etc/passwd", "a.jpg\x00.html", ".htaccess"):
        response = await client.post(upload_url(product), files=files(picture(), name), headers=tokens.staff())
        assert response.status_code == 201, response.text
        assert "pwned" not in response.text
        assert "passwd" not in response.text
    stored = stored_files(client)
    data_dir = client.app.state.inventory.settings.data_dir  # type: ignore[attr-defined]
    assert all(p.parent == data_dir / "uploads" / "inventory" for p in stored)
    names = [p.name for p in stored]
    assert len(names) == 5
    assert all(len(n) == len("0123456789abcdef0123456789abcdef.jpg") and n.endswith(".jpg") for n in names), names
    # Had the name been used, "../../../../tmp/pwned.jpg" would have landed beside this test's directory.
    assert not list(tmp_path.parent.rglob("pwned*"))


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>', "image/svg+xml"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "image/jpeg"),
        (b"<html><body><script>alert(1)</script></body></html>", "image/png"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,", "image/gif"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "image/jpeg"),
        (b"\x00" * 1000, "image/jpeg"),
        (b"MZ\x90\x00" + b"\x00" * 200, "image/png"),
    ],
)
async def test_non_images_are_415(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, data: bytes, content_type: str
) -> None:
    response = await client.post(upload_url(product), files=files(data, "x.jpg", content_type), headers=tokens.staff())
    assert_problem(response, 415)
    assert stored_files(client) == []


def truncated_jpeg() -> bytes:
    data = picture("JPEG", size=(200, 200))
    return data[: len(data) // 2]


def jpeg_with_markup_comment() -> bytes:
    data = picture("JPEG")
    comment = b"<script>alert(1)</script>"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return data[:2] + segment + data[2:]


def animated_png() -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="PNG", save_all=True, append_images=frames[1:])
    return out.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(picture() + zip_payload(), id="jpeg+zip polyglot"),
        pytest.param(picture() + b"<html><script>alert(1)</script></html>", id="jpeg+html trailer"),
        pytest.param(picture("PNG") + zip_payload(), id="png+zip polyglot"),
        pytest.param(picture("WEBP") + b"PK\x03\x04trailing", id="webp+trailer"),
        pytest.param(jpeg_with_markup_comment(), id="script in a jpeg comment"),
        pytest.param(truncated_jpeg(), id="truncated jpeg"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x00" * 100, id="jpeg signature, garbage body"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, id="png signature, garbage body"),
        pytest.param(animated_png(), id="animated png"),
        pytest.param(png_header_only(20_000, 20_000), id="400 megapixels declared"),
        pytest.param(png_header_only(8_000, 6_000), id="48 megapixels declared"),
    ],
)
async def test_damaged_polyglot_or_oversized_images_are_422(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, data: bytes
) -> None:
    response = await client.post(upload_url(product), files=files(data), headers=tokens.staff())
    body = assert_problem(response, 422)
    assert [error["loc"] for error in body["errors"]] == [["body", "file"]]  # type: ignore[union-attr]
    assert stored_files(client) == []


async def test_decompression_bomb_is_refused_before_decoding(
    client: httpx.AsyncClient, tokens: Tokens, product: dict
) -> None:
    bomb = png_bomb(7_000, 6_000)  # 42 megapixels of zeros: ~40 KB compressed, 42 MB decoded
    assert len(bomb) < 200_000
    body = assert_problem(await client.post(upload_url(product), files=files(bomb), headers=tokens.staff()), 422)
    assert "pixels" in str(body["detail"])


async def test_forty_megapixels_is_the_limit(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    ok = png_bomb(8_000, 5_000)
    response = await client.post(upload_url(product), files=files(ok, "a.png", "image/png"), headers=tokens.staff())
    assert response.status_code == 201, response.text


async def test_a_file_over_5_mib_is_413(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    data = picture() + b"\x00" * (5 * MiB)  # within the body limit (5 MiB + 64 KiB), over the file limit
    assert_problem(await client.post(upload_url(product), files=files(data), headers=tokens.staff()), 413)


async def test_a_body_over_the_limit_is_413_by_content_length(
    client: httpx.AsyncClient, tokens: Tokens, product: dict
) -> None:
    data = b"\xff\xd8\xff" + b"\x00" * (6 * MiB)
    assert_problem(await client.post(upload_url(product), files=files(data), headers=tokens.staff()), 413)


def multipart(data: bytes, boundary: str = "comptoir-boundary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


async def test_a_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    body = multipart(b"\xff\xd8\xff" + b"\x01" * (6 * MiB))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = tokens.staff() | {"content-type": "multipart/form-data; boundary=comptoir-boundary"}
    response = await client.post(upload_url(product), content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert stored_files(client) == []


async def test_a_lying_content_length_is_413(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    body = multipart(b"\xff\xd8\xff" + b"\x01" * (6 * MiB))
    headers = tokens.staff() | {
        "content-type": "multipart/form-data; boundary=comptoir-boundary",
        "content-length": "1000",
    }
    request = client.build_request("POST", upload_url(product), content=body, headers=headers)
    request.headers["content-length"] = "1000"
    assert_problem(await client.send(request), 413)


async def test_multipart_is_refused_elsewhere(client: httpx.AsyncClient, tokens: Tokens) -> None:
    response = await client.post("/api/v1/products", files=files(picture()), headers=tokens.staff())
    assert_problem(response, 415)


async def test_the_file_part_is_required(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    response = await client.post(
        upload_url(product), files={"other": ("a.jpg", picture(), "image/jpeg")}, headers=tokens.staff()
    )
    assert_problem(response, 422)
    response = await client.post(
        upload_url(product), data={"file": "not a file"}, files={"x": ("a", b"b")}, headers=tokens.staff()
    )
    assert_problem(response, 422)


async def test_uploads_are_for_staff_only(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    assert_problem(await client.post(upload_url(product), files=files(picture())), 401)
    assert_problem(await client.post(upload_url(product), files=files(picture()), headers=tokens.customer()), 403)
    assert stored_files(client) == []


async def test_unknown_product_or_image_is_404(client: httpx.AsyncClient, tokens: Tokens, product: dict) -> None:
    import uuid

    missing = {"id": str(uuid.uuid4())}
    assert_problem(await client.post(upload_url(missing), files=files(picture()), headers=tokens.staff()), 404)
    assert_problem(await client.get(f"{upload_url(product)}/{uuid.uuid4()}"), 404)
    assert_problem(await client.get(f"{upload_url(product)}/not-an-id"), 422)


async def test_images_of_inactive_products_are_for_staff(
    client: httpx.AsyncClient, tokens: Tokens, product: dict
) -> None:
    image = (await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())).json()
    await client.patch(f"/api/v1/products/{product['id']}", json={"is_active": False}, headers=tokens.staff())
    assert_problem(await client.get(image["url"]), 404)
    staff = await client.get(image["url"], headers=tokens.staff())
    assert staff.status_code == 200
    assert staff.headers["cache-control"] == "no-store"


async def test_images_per_product_are_capped(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, database: DatabaseFixture
) -> None:
    client.app.state.inventory.settings.max_images_per_product = 2  # type: ignore[attr-defined]
    for _ in range(2):
        assert (
            await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())
        ).status_code == 201
    assert_problem(await client.post(upload_url(product), files=files(picture()), headers=tokens.staff()), 409)
    assert len(stored_files(client)) == 2


async def test_each_image_is_an_audited_change(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, database: DatabaseFixture
) -> None:
    image = (await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())).json()
    admin = await database.admin()
    try:
        rows = await admin.fetch(
            "SELECT payload->>'actor_id' AS actor, payload->'new_values'->>'image_id' AS image"
            " FROM inventory.outbox WHERE payload->>'action' = 'inventory.product.image_added'"
        )
    finally:
        await admin.close()
    assert [(r["actor"], r["image"]) for r in rows] == [(tokens.staff_id, image["id"])]


async def test_an_image_whose_row_does_not_commit_leaves_no_file(
    client: httpx.AsyncClient, tokens: Tokens, product: dict, database: DatabaseFixture
) -> None:
    """The file is written before the row; if the transaction then fails at COMMIT (here a deferred check
    that refuses it), the file is removed too."""
    admin = await database.admin()
    try:
        await admin.execute(
            "CREATE FUNCTION inventory.refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
        )
        await admin.execute(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON inventory.product_images"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION inventory.refuse_at_commit()"
        )
        response = await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())
        assert_problem(response, 500)
        assert stored_files(client) == []
    finally:
        await admin.execute("DROP TRIGGER IF EXISTS refuse_at_commit ON inventory.product_images")
        await admin.execute("DROP FUNCTION IF EXISTS inventory.refuse_at_commit()")
        await admin.close()
    ok = await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())
    assert ok.status_code == 201, ok.text
    assert len(stored_files(client)) == 1


async def test_an_upload_with_another_part_is_422_as_the_schema_says(
    client: httpx.AsyncClient, tokens: Tokens, product: dict
) -> None:
    # The public schema declares the multipart body as exactly one `file` part (additionalProperties: false).
    response = await client.post(
        upload_url(product),
        files=files(picture("PNG"), "a.png", "image/png"),
        data={"caption": "42"},
        headers=tokens.staff(),
    )
    assert_problem(response, 422)
    assert response.json()["errors"] == [{"loc": ["body"], "msg": "Only the `file` part is accepted."}]
    listed = await client.get(f"/api/v1/products/{product['id']}")
    assert listed.json()["image_urls"] == []


async def test_storage_that_cannot_take_the_file_is_a_503_that_changes_nothing(
    client: httpx.AsyncClient, tokens: Tokens, product: dict
) -> None:
    """A full or read-only uploads volume (here its directory is a file: a mount gone wrong): the upload
    is refused with 503 and Retry-After, and neither a row nor a file is left."""
    directory: Path = client.app.state.inventory.images.directory  # type: ignore[attr-defined]
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_bytes(b"")
    try:
        response = await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())
        body = assert_problem(response, 503)
        assert body["type"] == "urn:comptoir:problem:image-storage-unavailable"
        assert response.headers["retry-after"] == "60"
        assert (await client.get(f"/api/v1/products/{product['id']}")).json()["image_urls"] == []
    finally:
        directory.unlink()
    assert (await client.post(upload_url(product), files=files(picture()), headers=tokens.staff())).status_code == 201
