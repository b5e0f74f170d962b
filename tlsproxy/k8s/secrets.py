"""Certificates kept in a Secret through the API: ``--provision-secret`` (fill, renew, serve) and
``--outbound-ca-secret`` (trust a Secret's ``ca.crt``).

Theory of operation
-------------------
A :class:`~.watch.Follower` hands over every state of the Secret (a get, then watch events, within
a second of any change). Each state does two things, in this order:

1. **Serve what is there** when it validates: it becomes the source's current
   :class:`~tlsproxy.certs.source.Material` and ``on_change`` is called, which is the proxy's
   reload (build → validate → swap; bad material never replaces good).
2. **Decide and write** (:func:`tlsproxy.certs.provision.plan`, in a worker thread: key generation
   is CPU work): when the plan says Write, ``PUT`` the Secret with the resourceVersion that was
   read. Success: serve what was written at once. 409 Conflict: another replica wrote first; read
   the Secret again and plan on *its* content (which normally says Keep). Any other failure (403,
   API unreachable): logged and counted, the current material keeps being served, and the write is
   retried with backoff.

Between changes the loop sleeps until the plan's ``next_check`` (renewal, rollover steps), so a
certificate is renewed without a restart and without any event. The API server going away changes
nothing for clients: the material in memory keeps being served while the follower retries.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..certs import provision
from ..certs.source import Material, PairBytes
from ..config import Settings
from ..errors import CertError
from ..log import get_logger
from ..metrics import Metrics
from . import config as kconfig
from .client import SECRETS, APIError, Client
from .config import ClusterConfig, ObjectRef
from .watch import Backoff, Follower, resource_version

log = get_logger("k8s.secrets")

OnChange = Callable[[str], Awaitable[object]]
MAX_CONFLICT_ROUNDS = 5       # read-plan-write rounds after 409s before backing off


def decode_data(obj: dict | None) -> dict[str, bytes]:
    """A Secret's ``data`` (base64 values) as bytes; an undecodable value reads as empty."""
    out: dict[str, bytes] = {}
    for key, value in ((obj or {}).get("data") or {}).items():
        try:
            out[str(key)] = base64.b64decode(str(value or ""), validate=True)
        except ValueError:
            out[str(key)] = b""
    return out


def encode_data(data: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode("ascii") for k, v in sorted(data.items())}


def material_of(data: dict[str, bytes], ref: ObjectRef) -> Material:
    where = f"Secret {ref}"
    ca_path = f"{where} ca.crt" if provision.CA in data else None
    pair = PairBytes(data.get(provision.CERT, b""), data.get(provision.KEY, b""), f"{where} tls.crt",
                     f"{where} tls.key", data.get(provision.CA), ca_path)
    return Material((pair,))


def default_dns_names(settings: Settings, ref: ObjectRef) -> tuple[str, ...]:
    """``--provision-service`` names expanded (NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local),
    then ``--provision-dns``; with neither, the Service named like the Secret without ``-tls``."""
    assert ref.namespace is not None
    services = settings.provision_service or \
        (() if settings.provision_dns else (ref.name.removesuffix("-tls"),))
    names: list[str] = []
    for service in services:
        names += provision.service_dns_names(service, ref.namespace)
    names += settings.provision_dns
    return tuple(dict.fromkeys(names))


def cluster_config(settings: Settings, env: dict[str, str] | None = None,
                   sa_dir: Path = kconfig.SA_DIR) -> ClusterConfig:
    return kconfig.discover(settings.kubeconfig, env, sa_dir)


class ProvisionedSecret:
    """A certificate source (``read``/``describe``/``watch_paths``, like ``certs.source.CertSource``)
    whose material lives in a Secret that this process fills and renews; ``serve`` runs it."""

    watch_paths: tuple[Path, ...] = ()

    def __init__(self, ref: ObjectRef, policy: provision.Policy, cluster: ClusterConfig,
                 metrics: Metrics | None = None) -> None:
        self.ref = ref
        self.policy = policy
        self.cluster = cluster
        self.metrics = metrics
        self.material: Material | None = None
        self.latest: dict | None = None          # the Secret as last read (None: not read, or absent)
        self.read_once = False
        self.last_plan: provision.Plan | None = None
        self._wake = trio.Event()
        self.first_material = trio.Event()      # set once something servable was read or written
        self.client: Client | None = None
        self.follower: Follower | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None, *,
                      env: dict[str, str] | None = None) -> ProvisionedSecret:
        assert settings.provision_secret is not None
        cluster = cluster_config(settings, env)
        ref = settings.provision_secret.resolved(cluster.namespace)
        policy = provision.Policy(default_dns_names(settings, ref), ca_name=f"{ref} tlsproxy CA",
                                  leaf_validity=dt.timedelta(seconds=settings.provision_cert_validity_s),
                                  ca_validity=dt.timedelta(seconds=settings.provision_ca_validity_s),
                                  rollover_delay=dt.timedelta(seconds=settings.provision_rollover_delay_s))
        return cls(ref, policy, cluster, metrics)

    # ------------------------------------------------------------------ the CertSource surface
    def describe(self) -> str:
        return f"Secret {self.ref} (provisioned through {self.cluster.server})"

    def read(self) -> Material:
        if self.material is None:
            if not self.read_once:
                raise CertError(f"Secret {self.ref}", "not read from the Kubernetes API yet (it is read "
                                "once the proxy runs)")
            raise CertError(f"Secret {self.ref}", "holds no usable certificate yet (being provisioned)")
        return self.material

    def ca_pem(self) -> bytes | None:
        """The Secret's ``ca.crt`` as served now (the webhook's caBundle)."""
        if self.material is None:
            return None
        return self.material.pairs[0].ca_pem

    # ------------------------------------------------------------------ running
    async def serve(self, on_change: OnChange, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    after_change: Callable[[], None] | None = None) -> None:
        log.info("provisioning certificates in a Secret", secret=str(self.ref), api=self.cluster.server,
                 credentials=self.cluster.source, dns_names=",".join(self.policy.dns_names))
        async with Client(self.cluster, self.metrics) as client:
            self.client = client
            self.follower = Follower(client, SECRETS, self.ref, self._on_object)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.follower.run)
                task_status.started()
                await self._reconcile(on_change, after_change)

    async def _on_object(self, obj: dict | None) -> None:
        self.read_once = True
        if obj is None and (self.latest is not None or self.material is None):
            log.error("Secret does not exist; create it (an empty Opaque Secret with no data will do); "
                      "serving what was read before, if anything", secret=str(self.ref))
        self.latest = obj
        self._wake.set()

    async def _reconcile(self, on_change: OnChange, after_change: Callable[[], None] | None) -> None:
        backoff = Backoff()
        conflicts = 0
        while True:
            self._wake = trio.Event()
            obj = self.latest
            wait_s: float | None = None
            if obj is not None:
                try:
                    wait_s, conflicts = await self._step(obj, on_change, after_change, backoff, conflicts)
                except Exception as exc:  # noqa: BLE001 - a bug here must never take the proxy down
                    log.error("provisioning step failed; serving what is loaded, retrying",
                              secret=str(self.ref), error=f"{type(exc).__name__}: {exc}")
                    wait_s = backoff.take()
                if wait_s == 0:
                    continue
            with trio.move_on_after(wait_s if wait_s is not None else float("inf")):
                await self._wake.wait()

    async def _step(self, obj: dict, on_change: OnChange, after_change: Callable[[], None] | None,
                    backoff: Backoff, conflicts: int) -> tuple[float | None, int]:
        """One read-plan-write round: (seconds to wait before the next, None: until a change;
        the count of conflicts in a row)."""
        data = decode_data(obj)
        await self._publish(data, on_change, after_change)
        now = dt.datetime.now(dt.UTC)
        p = await trio.to_thread.run_sync(provision.plan, data, self.policy, now,
                                          f"Secret {self.ref}")
        self._note_plan(p)
        if isinstance(p, provision.Write):
            outcome = await self._write(obj, p)
            if outcome == "written":
                backoff.reset()
                return 0, 0
            if outcome == "conflict" and conflicts < MAX_CONFLICT_ROUNDS:
                return 0, conflicts + 1
            return backoff.take(), 0
        backoff.reset()
        if p.next_check is None:
            return None, 0
        return max(0.05, (p.next_check - dt.datetime.now(dt.UTC)).total_seconds()), 0

    def _note_plan(self, p: provision.Plan) -> None:
        last = self.last_plan
        self.last_plan = p
        if not isinstance(p, provision.Keep):
            return
        if not isinstance(last, provision.Keep) or last.reason != p.reason:
            log.info("provisioned Secret checked", secret=str(self.ref), state=p.reason,
                     next_check=p.next_check.isoformat() if p.next_check else "none")

    async def _publish(self, data: dict[str, bytes], on_change: OnChange,
                       after_change: Callable[[], None] | None) -> None:
        material = material_of(data, self.ref)
        if self.material is not None and material.digest == self.material.digest:
            return
        try:
            await trio.to_thread.run_sync(material.bundles)
        except CertError:
            return        # not servable: the plan will replace it; meanwhile the old material stays
        self.material = material
        await on_change("secret")
        self.first_material.set()
        if after_change is not None:
            after_change()

    async def _write(self, obj: dict, p: provision.Write) -> str:
        assert self.client is not None and self.follower is not None
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": dict(obj.get("metadata") or {}),
                "type": obj.get("type") or "kubernetes.io/tls", "data": encode_data(p.data)}
        body["metadata"].pop("managedFields", None)
        annotations = dict(body["metadata"].get("annotations") or {})
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        annotations["tlsproxy.io/provisioned"] = f"{p.step} {stamp}"
        body["metadata"]["annotations"] = annotations
        try:
            written = await self.client.update(SECRETS, self.ref, body)
        except APIError as exc:
            result = "conflict" if exc.conflict else "failed"
            if self.metrics is not None:
                self.metrics.provision_writes.labels(p.step, result).inc()
            if exc.conflict:
                log.info("Secret changed before our write (another replica?); reading it again",
                         secret=str(self.ref), step=p.step)
                try:
                    await self.follower.refresh()
                except APIError:
                    return "failed"
                return "conflict"
            log.error("cannot write the provisioned Secret; serving what it holds", secret=str(self.ref),
                      step=p.step, reason=exc.message)
            return "failed"
        if self.metrics is not None:
            self.metrics.provision_writes.labels(p.step, "written").inc()
        log.info("provisioned Secret written", secret=str(self.ref), step=p.step, detail=p.detail,
                 resource_version=resource_version(written))
        if self.latest is obj:         # a newer state seen meanwhile (a watch event) stays
            self.latest = written
        return "written"


class CASecret:
    """The ``ca.crt`` of a Secret, followed through the API (``--outbound-ca-secret``)."""

    def __init__(self, ref: ObjectRef, cluster: ClusterConfig, metrics: Metrics | None = None) -> None:
        self.ref = ref
        self.cluster = cluster
        self.metrics = metrics
        self.ca_pem: bytes | None = None
        self.read_once = False
        self._on_change: OnChange | None = None

    def describe(self) -> str:
        return f"ca.crt of Secret {self.ref}"

    async def serve(self, on_change: OnChange, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._on_change = on_change
        async with Client(self.cluster, self.metrics) as client:
            follower = Follower(client, SECRETS, self.ref, self._on_object)
            await follower.run(task_status=task_status)

    async def _on_object(self, obj: dict | None) -> None:
        self.read_once = True
        ca = decode_data(obj).get(provision.CA) if obj is not None else None
        if not ca or not ca.strip():
            log.warning("Secret has no ca.crt; keeping the CA bundle loaded before, if any",
                        secret=str(self.ref))
            return
        if ca != self.ca_pem:
            self.ca_pem = ca
            if self._on_change is not None:
                await self._on_change("secret")
