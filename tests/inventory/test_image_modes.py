"""Uploaded images are 0644 and their directories 0755, whatever the process umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx

from tests.inventory.support import Tokens, create_product
from tests.inventory.test_images import files, picture, upload_url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_files_are_0644_and_directories_0755_even_under_a_strict_umask(
    client: httpx.AsyncClient, tokens: Tokens
) -> None:
    product = await create_product(client, tokens, stock=1)
    directory: Path = client.app.state.inventory.images.directory  # type: ignore[attr-defined]
    previous = os.umask(0o077)  # would give 0600 files and 0700 directories if modes were left to it
    try:
        response = await client.post(upload_url(product), files=files(picture("PNG"), "x.png"), headers=tokens.staff())
        assert response.status_code == 201, response.text
        second = await client.post(upload_url(product), files=files(picture("JPEG")), headers=tokens.staff())
        assert second.status_code == 201, second.text
    finally:
        os.umask(previous)
    stored = sorted(p for p in directory.iterdir() if p.is_file())
    assert len(stored) == 2
    assert [mode(p) for p in stored] == [0o644, 0o644]
    assert mode(directory) == 0o755
    # No temporary file was left behind, and the images are served.
    assert not [p for p in stored if p.name.startswith(".")]
    served = await client.get(response.json()["url"])
    assert served.status_code == 200
