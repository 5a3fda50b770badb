"""A TypeScript client's types (openapi-typescript) generated from the public document, checked by tsc --strict.

The tools are pinned and installed once into the repository's own .venv (no global install); without npm,
or without access to its registry, the test is skipped and says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comptoir.openapi import build_document

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".venv" / "ts-contract"
PINNED = ("openapi-typescript@7.13.0", "typescript@5.9.3")
SOURCE = Path(__file__).with_name("typescript") / "client.ts"


def tools() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the TypeScript client is not checked")
    bin_dir = TOOLS / "node_modules" / ".bin"
    if not (bin_dir / "tsc").exists() or not (bin_dir / "openapi-typescript").exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        (TOOLS / "package.json").write_text('{"private": true}\n', encoding="utf-8")
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", *PINNED],
            cwd=TOOLS,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if installed.returncode != 0:
            pytest.skip(f"npm could not install {' '.join(PINNED)}: {installed.stderr[-300:]}")
    return bin_dir


def test_typescript_client_type_checks_against_the_document(tmp_path: Path) -> None:
    bin_dir = tools()
    (tmp_path / "openapi.json").write_text(json.dumps(build_document()), encoding="utf-8")
    generated = subprocess.run(
        [str(bin_dir / "openapi-typescript"), "openapi.json", "-o", "api.d.ts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    shutil.copy(SOURCE, tmp_path / "client.ts")
    checked = subprocess.run(
        [str(bin_dir / "tsc"), "--strict", "--noEmit", "--skipLibCheck", "--target", "es2020", "client.ts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
