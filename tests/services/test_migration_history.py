"""Each service's migration history is one line: one head, and no revision id used twice.

Two branches of work that each add a migration on the same parent give two heads (and `comptoir migrate`
refuses to run); two files that reuse an id make Alembic silently keep one of them.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

SERVICES = ["auth", "inventory", "orders", "audit"]
ROOT = Path(__file__).resolve().parents[2]


def _assigned(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
                return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} assigns no {name}")


@pytest.mark.parametrize("service", SERVICES)
def test_one_head_and_unique_revision_ids(service: str) -> None:
    versions = ROOT / "services" / service / "migrations" / "versions"
    ids = Counter(_assigned(path, "revision") for path in versions.glob("*.py"))
    assert [rev for rev, n in ids.items() if n > 1] == []
    script = ScriptDirectory(str(versions.parent), version_locations=[str(versions)])
    assert len(script.get_heads()) == 1, script.get_heads()
