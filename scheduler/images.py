"""Pre-pull: every endpoint's image is fetched in the background (at start, on reload, on
create and update), so no call pays for a pull.

Owns what berth knows of each image: `present`, `pulling (n of m layers)` or `missing:
<reason>`; only the ImagePuller changes it (the pull's thread counts layers). A replica start
that finds a pull under way waits for it instead of pulling again. With `docker.pull = false`
nothing is pulled and an absent image is `missing`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from berth.scheduler.runtime import DockerRuntime, DockerUnavailable, ImageUnavailable

log = structlog.get_logger("berth.images")
DONE = ("Pull complete", "Already exists")


@dataclass
class Pull:
    """Layers of one pull as the engine reports them (written by the pull's thread)."""

    layers: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)

    def heard(self, layer: str, status: str) -> None:
        if status.startswith(("Pulling fs layer", "Waiting", "Downloading", "Verifying",
                              "Download complete", "Extracting", *DONE)):
            self.layers.add(layer)
        if status.startswith(DONE):
            self.done.add(layer)

    def text(self) -> str:
        if not self.layers:
            return "pulling"
        return f"pulling ({len(self.done)} of {len(self.layers)} layers)"


class ImagePuller:
    def __init__(self, runtime: DockerRuntime) -> None:
        self.runtime = runtime
        self._present: set[str] = set()
        self._missing: dict[str, str] = {}
        self._pulls: dict[str, Pull] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # One background pull at a time: each holds a thread of the runtime's small pool,
        # which container starts and stops need too.
        self._one_at_a_time = asyncio.Semaphore(1)

    def state(self, image: str) -> str:
        """present | pulling (n of m layers) | missing: <reason> | unknown (not looked at)."""
        if image in self._present:
            return "present"
        if image in self._pulls:
            return self._pulls[image].text()
        if image in self._missing:
            return f"missing: {self._missing[image]}"
        return "unknown"

    def want(self, images: Iterable[str]) -> None:
        """Make sure these images are (or become) present, in the background."""
        for image in set(images):
            if image not in self._present and image not in self._tasks:
                self._tasks[image] = asyncio.get_running_loop().create_task(
                    self._fetch(image), name=f"pull:{image}")

    async def settled(self, image: str) -> None:
        """Wait for a background pull of `image`, if one runs (a start then finds it there)."""
        task = self._tasks.get(image)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def _fetch(self, image: str) -> None:
        pull = self._pulls[image] = Pull()
        try:
            async with self._one_at_a_time:
                await self.runtime.ensure_image(image, pull.heard)
        except ImageUnavailable as exc:
            self._missing[image] = str(exc)
        except DockerUnavailable as exc:  # looked at again at the next want
            self._missing[image] = f"the Docker engine is unreachable ({exc})"
        else:
            self._present.add(image)
            self._missing.pop(image, None)
            if pull.layers:
                log.info("image.pulled", image=image, layers=len(pull.layers),
                         message=f"image {image} pulled ahead of any call")
        finally:
            self._pulls.pop(image, None)
            self._tasks.pop(image, None)

    def forget(self, image: str) -> None:
        """The image may have gone from the engine (a start found it missing)."""
        self._present.discard(image)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
