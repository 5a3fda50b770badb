"""Untrusted image bytes in, a clean re-encoded image out (or a refusal).

The rules, in order: the bytes must *be* a JPEG, PNG or WebP by their signature (the client's content
type and file name are ignored); the container must end where the format says it ends (a ZIP, HTML or
script appended to an image makes a polyglot, refused); no markup anywhere; at most ``max_pixels``
pixels, checked from the header before anything is decoded (decompression bombs); one frame; it must
decode completely with Pillow. The pixels are then re-encoded into a new file without EXIF, ICC, XMP,
comments or text chunks, so nothing the client put around the pixels is ever served.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import Image, ImageFile, ImageOps

from services.inventory.errors import InvalidImage, UnsupportedImageType

log = structlog.get_logger("comptoir.inventory.images")

# Pillow refuses (DecompressionBombError) images above twice this and warns above it; the warning is
# turned into an error below, and the header is checked against the configured limit before decoding.
Image.MAX_IMAGE_PIXELS = 40_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Format:
    pillow: str
    content_type: str
    extension: str


JPEG = Format("JPEG", "image/jpeg", "jpg")
PNG = Format("PNG", "image/png", "png")
WEBP = Format("WEBP", "image/webp", "webp")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Markup that makes a file render as a page or script in some browser or viewer.
_MARKUP = re.compile(
    rb"<\s*(script|html|body|svg|iframe|object|embed|meta|!doctype|\?xml-stylesheet)|javascript:", re.IGNORECASE
)


@dataclass(frozen=True)
class CleanImage:
    data: bytes
    format: Format
    width: int
    height: int
    sha256: str


def sniff(data: bytes) -> Format | None:
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(PNG_SIGNATURE):
        return PNG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    return None


def _jpeg_end(data: bytes, start: int = 0) -> int:
    """Offset just after the EOI marker of the JPEG stream starting at ``start``."""
    n = len(data)
    pos = start + 2
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise InvalidImage("The JPEG structure is damaged.")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise InvalidImage("The JPEG file is truncated.")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if pos + 2 > n:
            raise InvalidImage("The JPEG file is truncated.")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise InvalidImage("The JPEG structure is damaged.")
        pos += length
        if marker != 0xDA:
            continue
        # Entropy-coded data: FF is followed by 00 (stuffing), a restart marker, fill FFs or the next marker.
        while True:
            ff = data.find(b"\xff", pos)
            if ff < 0 or ff + 1 >= n:
                raise InvalidImage("The JPEG file is truncated.")
            following = data[ff + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                pos = ff + 2
            elif following == 0xFF:
                pos = ff + 1
            else:
                pos = ff
                break


def _png_end(data: bytes) -> int:
    n = len(data)
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > n:
            raise InvalidImage("The PNG file is truncated.")
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunk_type = data[pos + 4 : pos + 8]
        pos += 12 + length
        if pos > n:
            raise InvalidImage("The PNG file is truncated.")
        if chunk_type == b"IEND":
            return pos


def _webp_end(data: bytes) -> int:
    size = int.from_bytes(data[4:8], "little")
    end = 8 + size + (size & 1)
    if size < 4 or end > len(data) + (size & 1):
        raise InvalidImage("The WebP file is truncated.")
    return min(end, len(data))


def container_end(data: bytes, fmt: Format) -> int:
    if fmt is JPEG:
        end = _jpeg_end(data)
        # Phones append further JPEG streams (MPF: depth and gain maps); those are images, not payloads.
        while data.startswith(b"\xff\xd8\xff", end):
            end = _jpeg_end(data, end)
        return end
    if fmt is PNG:
        return _png_end(data)
    return _webp_end(data)


def check_structure(data: bytes, fmt: Format) -> None:
    end = container_end(data, fmt)
    if data[end:].strip(b"\x00"):
        raise InvalidImage("The file carries data after the end of the image (a polyglot); it is refused.")
    if _MARKUP.search(data):
        raise InvalidImage("The file carries markup or script; it is refused.")


def _normalise_mode(image: Image.Image, fmt: Format) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if fmt is JPEG:
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    if has_alpha:
        return image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.mode in ("RGB", "L") and fmt is PNG else image.convert("RGB")


def process(data: bytes, *, max_pixels: int) -> CleanImage:
    """Validate and re-encode; raises UnsupportedImageType (415) or InvalidImage (422). CPU-bound: run in a thread."""
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedImageType("Upload a JPEG, PNG or WebP image.")
    check_structure(data, fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt.pillow]) as opened:
                width, height = opened.size
                if width < 1 or height < 1 or width * height > max_pixels:
                    raise InvalidImage(f"The image is larger than {max_pixels} pixels.")
                if getattr(opened, "n_frames", 1) != 1:
                    raise InvalidImage("Animated images are not accepted.")
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                clean = _normalise_mode(image, fmt).copy()
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"The image is larger than {max_pixels} pixels.") from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) on bad input
        log.info("inventory.image.undecodable", error=type(exc).__name__)
        raise InvalidImage("The file could not be decoded as an image.") from exc
    clean.info = {}  # no EXIF, ICC profile, XMP, comments or text chunks travel into the new file
    out = io.BytesIO()
    if fmt is JPEG:
        clean.save(out, format="JPEG", quality=88, optimize=False)
    elif fmt is PNG:
        clean.save(out, format="PNG", compress_level=6)
    else:
        clean.save(out, format="WEBP", quality=88, method=4)
    encoded = out.getvalue()
    return CleanImage(
        data=encoded,
        format=fmt,
        width=clean.width,
        height=clean.height,
        sha256=hashlib.sha256(encoded).hexdigest(),
    )


# ---- on disk: readable by the web server or CDN that may serve them, writable by the service only ----

FILE_MODE = 0o644
DIRECTORY_MODE = 0o755


def make_directory(path: Path) -> None:
    """``path`` and the parents this creates, all 0755 whatever the process umask (mkdir's mode is
    masked by it; chmod is not)."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for directory in {path, *created}:
        os.chmod(directory, DIRECTORY_MODE)


def create_file(path: Path) -> int:
    """A new file (never an existing one or a link), 0644 whatever the umask: a file descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd
