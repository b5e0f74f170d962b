"""Follow one object through the API: its state now and every change, for as long as we run.

Theory of operation
-------------------
``get`` the object, hand it over, then ``watch`` from its resourceVersion with bookmarks. Each event
hands over the new state (``None`` for a deletion); a bookmark only moves the resourceVersion, so a
resumed watch does not replay what was seen. When the server ends the stream (its
``timeoutSeconds``) the watch resumes from the last resourceVersion. A 410 Gone (the version was
compacted away) means *relist*: ``get`` again, hand it over, watch from there.

Any other failure (API server unreachable, a timeout, 403, 5xx) is logged and counted by the client;
here it only means: wait (exponential backoff, ``BACKOFF_MIN_S`` to ``BACKOFF_MAX_S``, with jitter so
replicas do not retry in step) and start over with a ``get``. Whoever consumes the states keeps
what it has meanwhile; a sidecar keeps serving the certificate it has.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import trio

from ..log import get_logger
from .client import APIError, Client, Resource
from .config import ObjectRef

log = get_logger("k8s.watch")

BACKOFF_MIN_S = 0.5     # the first retry after a failure
BACKOFF_MAX_S = 30.0    # client-go's reflector backs off up to 30 s as well
MIN_WATCH_S = 1.0       # a watch the server ends sooner than this is resumed after a backoff

OnObject = Callable[[dict | None], Awaitable[None]]


class Backoff:
    def __init__(self, low_s: float = BACKOFF_MIN_S, high_s: float = BACKOFF_MAX_S) -> None:
        self.low_s, self.high_s = low_s, high_s
        self.next_s = low_s

    def reset(self) -> None:
        self.next_s = self.low_s

    def take(self) -> float:
        delay = self.next_s * random.uniform(0.8, 1.2)
        self.next_s = min(self.next_s * 2, self.high_s)
        return delay


def resource_version(obj: dict | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class Follower:
    """Calls ``on_object`` with the object's state after every get and change (never concurrently)."""

    def __init__(self, client: Client, resource: Resource, ref: ObjectRef, on_object: OnObject, *,
                 backoff: Backoff | None = None) -> None:
        self.client = client
        self.resource = resource
        self.ref = ref
        self.on_object = on_object
        self.backoff = backoff or Backoff()
        self.resource_version = ""
        self.healthy = False           # the last get or watch worked
        self.last_error: APIError | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self._get()
                while True:
                    began = trio.current_time()
                    await self.client.watch(self.resource, self.ref, self.resource_version, self._event)
                    if trio.current_time() - began < MIN_WATCH_S:   # ended at once: do not spin
                        await trio.sleep(self.backoff.take())
            except APIError as exc:
                self.last_error = exc
                if exc.gone:                     # compacted: relist now, no backoff
                    log.info("watch expired; reading the object again", object=str(self.ref))
                    continue
                self.healthy = False
                if exc.code == 404:
                    await self.on_object(None)
                await trio.sleep(self.backoff.take())

    async def _get(self) -> None:
        obj = await self.client.get(self.resource, self.ref)
        self.resource_version = resource_version(obj)
        self.healthy = True
        self.last_error = None
        self.backoff.reset()
        await self.on_object(obj)

    async def _event(self, event: dict) -> None:
        kind = event.get("type")
        obj = event.get("object") if isinstance(event.get("object"), dict) else None
        rv = resource_version(obj)
        if rv:
            self.resource_version = rv
        self.backoff.reset()
        if kind in ("ADDED", "MODIFIED"):
            await self.on_object(obj)
        elif kind == "DELETED":
            await self.on_object(None)

    async def refresh(self) -> dict | None:
        """Read the object now (after a 409, say); hands it over too. Raises APIError."""
        try:
            obj = await self.client.get(self.resource, self.ref)
        except APIError as exc:
            if exc.code == 404:
                await self.on_object(None)
                return None
            raise
        await self.on_object(obj)
        return obj
