"""Keep a MutatingWebhookConfiguration's ``caBundle`` equal to the webhook's own ``ca.crt``.

Theory of operation
-------------------
The API server trusts the webhook only through ``caBundle`` (base64 PEM) of each entry of its
MutatingWebhookConfiguration. A :class:`~.watch.Follower` hands over every state of that object
(so a hand edit, a re-apply of the manifests without ``caBundle``, a restore from backup, is seen
within a second); the provisioned Secret says when ``ca.crt`` changed (:meth:`ca_changed`). After
either, every entry whose ``caBundle`` differs is patched — one strategic merge patch (entries are
merged by ``name``, the API's patch key for ``webhooks``) carrying the resourceVersion that was read
as a precondition. 409: read again and decide again. Any other failure is logged and counted by the
client and retried with backoff; the webhook keeps serving meanwhile.

During a CA rollover ``ca.crt`` holds the old and the new CA, so the API server trusts both leaves.
RBAC: get, watch and patch on that one object (``resourceNames``), nothing else.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import trio

from ..config import ObjectRef
from ..log import get_logger
from ..metrics import Metrics
from .client import MUTATING_WEBHOOKS, STRATEGIC_MERGE_PATCH, APIError, Client
from .config import ClusterConfig
from .watch import Backoff, Follower, resource_version

log = get_logger("k8s.cabundle")


def bundle_patch(obj: dict, ca_pem: bytes) -> dict | None:
    """The strategic merge patch that sets every entry's ``caBundle`` to ``ca_pem``, or None when
    they all have it already. Pure."""
    want = base64.b64encode(ca_pem).decode("ascii")
    hooks = [h for h in obj.get("webhooks") or [] if isinstance(h, dict) and h.get("name")]
    stale = [h["name"] for h in hooks if (h.get("clientConfig") or {}).get("caBundle") != want]
    if not stale:
        return None
    return {"metadata": {"resourceVersion": resource_version(obj)},
            "webhooks": [{"name": name, "clientConfig": {"caBundle": want}} for name in stale]}


class CABundleKeeper:
    def __init__(self, name: str, ca_pem: Callable[[], bytes | None], cluster: ClusterConfig,
                 metrics: Metrics | None = None) -> None:
        self.ref = ObjectRef(None, name)
        self.ca_pem = ca_pem
        self.cluster = cluster
        self.metrics = metrics
        self.latest: dict | None = None
        self.in_sync = False
        self._wake = trio.Event()

    def ca_changed(self) -> None:
        self._wake.set()

    async def _on_object(self, obj: dict | None) -> None:
        if obj is None:
            log.error("MutatingWebhookConfiguration does not exist; apply config/webhook/",
                      name=self.ref.name)
        self.latest = obj
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with Client(self.cluster, self.metrics) as client:
            follower = Follower(client, MUTATING_WEBHOOKS, self.ref, self._on_object)
            async with trio.open_nursery() as nursery:
                await nursery.start(follower.run)
                task_status.started()
                backoff = Backoff()
                while True:
                    self._wake = trio.Event()
                    wait_s = await self._step(client, follower, backoff)
                    if wait_s == 0:
                        continue
                    with trio.move_on_after(wait_s if wait_s is not None else float("inf")):
                        await self._wake.wait()

    async def _step(self, client: Client, follower: Follower, backoff: Backoff) -> float | None:
        obj, ca = self.latest, self.ca_pem()
        if obj is None or not ca:
            return None
        patch = bundle_patch(obj, ca)
        if patch is None:
            if not self.in_sync:
                log.info("webhook caBundle matches the CA", name=self.ref.name)
            self.in_sync = True
            backoff.reset()
            return None
        self.in_sync = False
        try:
            written = await client.patch(MUTATING_WEBHOOKS, self.ref, patch, STRATEGIC_MERGE_PATCH)
        except APIError as exc:
            result = "conflict" if exc.conflict else "failed"
            if self.metrics is not None:
                self.metrics.cabundle_patches.labels(result).inc()
            if exc.conflict:
                try:
                    await follower.refresh()
                except APIError:
                    return backoff.take()
                return 0
            log.error("cannot patch the webhook caBundle; retrying", name=self.ref.name, reason=exc.message)
            return backoff.take()
        if self.metrics is not None:
            self.metrics.cabundle_patches.labels("patched").inc()
        log.info("webhook caBundle patched", name=self.ref.name,
                 entries=",".join(h["name"] for h in patch["webhooks"]),
                 resource_version=resource_version(written))
        if self.latest is obj:         # a newer state seen meanwhile (a watch event) stays
            self.latest = written
        backoff.reset()
        return 0
