"""Background loops owned by an app's lifespan: started there, cancelled and awaited there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class BackgroundLoop:
    """Subclasses implement ``_run`` (an endless loop); ``start``/``stop`` manage its task."""

    task_name = "background-loop"
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    @property
    def running(self) -> bool:
        return self._task is not None

    @contextlib.asynccontextmanager
    async def alive(self, enabled: bool = True) -> AsyncIterator[None]:
        """The loop runs (if ``enabled``) for the duration of the block, and is stopped at its end."""
        if enabled:
            self.start()
        try:
            yield
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
