"""The embedded PostgreSQL's lifetime across runs: a run killed outright (``kill -9``) leaves its server
running; the next run joins it, and when that run stops, the server must stop with it, while a holder that
is still alive keeps it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from comptoir.embedded import EmbeddedPostgres

HOLD = (
    "import sys, time; from pathlib import Path; from comptoir.embedded import EmbeddedPostgres; "
    "EmbeddedPostgres(Path(sys.argv[1])).start(); print('up', flush=True); time.sleep(600)"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _hold(data_dir: Path) -> subprocess.Popen[str]:
    """Another process holding the server of ``data_dir`` (started by it if none runs)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "up"
    return holder


@contextmanager
def postmaster_of(data_dir: Path) -> Iterator[tuple[Path, int]]:
    """The running server's pid file and pid; whatever the test proves, the server is gone afterwards."""
    pid_file = data_dir / "pg" / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])
    try:
        yield pid_file, postmaster
    finally:
        if _alive(postmaster):
            os.kill(postmaster, signal.SIGQUIT)


def test_a_server_left_by_a_killed_run_stops_with_the_next_run(tmp_path: Path) -> None:
    holder = _hold(tmp_path)
    holder.kill()
    holder.wait()
    with postmaster_of(tmp_path) as (pid_file, postmaster):
        assert _alive(postmaster)  # left running by the run that was killed
        embedded = EmbeddedPostgres(tmp_path)
        embedded.start()
        embedded.stop()
        assert not pid_file.exists(), "the server outlived the run that said it stopped it"


def test_a_holder_that_dies_after_this_run_joined_does_not_keep_the_server_up(tmp_path: Path) -> None:
    """`comptoir backup` joins the server of a running `comptoir run` and is killed outright; when the run
    stops, the server stops with it."""
    embedded = EmbeddedPostgres(tmp_path)
    embedded.start()
    with postmaster_of(tmp_path) as (pid_file, _):
        holder = _hold(tmp_path)
        holder.kill()
        holder.wait()
        embedded.stop()
        assert not pid_file.exists()


def test_a_live_holder_keeps_the_server_when_another_one_stops(tmp_path: Path) -> None:
    """Only dead holders are forgotten: a `comptoir migrate` that joins a running system and ends must not
    stop the database under it."""
    holder = _hold(tmp_path)
    try:
        with postmaster_of(tmp_path) as (pid_file, postmaster):
            embedded = EmbeddedPostgres(tmp_path)
            embedded.start()
            embedded.stop()
            assert _alive(postmaster)
            assert pid_file.exists()
    finally:
        holder.kill()
        holder.wait()
