"""Requests to the Kubernetes API: get, update (PUT), patch, watch. Each has a timeout; each failure
is one :class:`APIError`, one log line and one count in ``tlsproxy_k8s_api_errors_total{verb,code}``.

httpx runs under trio (through anyio), so the client lives in the proxy's own event loop. One
``httpx.AsyncClient`` keeps its connections alive between requests; a watch holds one connection
for as long as the stream lasts. The bearer token is asked from the config on every request (it
re-reads a rotated service-account token file); a 401 re-reads it at once and retries once.

A 403 names the permission that is missing — verb, resource, namespace, name — and the Role rule
that grants it, so the log line is the fix.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import TLSProxyError
from ..log import get_logger
from ..metrics import Metrics
from .config import ClusterConfig, ObjectRef

log = get_logger("k8s")

REQUEST_TIMEOUT_S = 10.0     # one API call; client-go has no default, kubectl's --request-timeout is 0
WATCH_TIMEOUT_S = 300        # the server ends a watch after this (timeoutSeconds); we then resume it
WATCH_READ_GRACE_S = 30.0    # no byte (not even a bookmark) this much past the watch timeout: dead
MAX_STATUS_TEXT = 300        # the API server's message, quoted in our error, is cut here

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


@dataclass(frozen=True)
class Resource:
    """An API resource: where its URLs start, its plural name, whether it lives in a namespace."""

    prefix: str          # /api/v1 or /apis/GROUP/VERSION
    plural: str
    namespaced: bool

    @property
    def group(self) -> str:
        return "" if self.prefix.startswith("/api/") else self.prefix.split("/")[2]

    def collection(self, ref: ObjectRef) -> str:
        if self.namespaced:
            return f"{self.prefix}/namespaces/{ref.namespace}/{self.plural}"
        return f"{self.prefix}/{self.plural}"

    def path(self, ref: ObjectRef) -> str:
        return f"{self.collection(ref)}/{ref.name}"


SECRETS = Resource("/api/v1", "secrets", True)
MUTATING_WEBHOOKS = Resource("/apis/admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", False)


class APIError(TLSProxyError):
    """A failed API call. ``code`` is the HTTP status, or ``unreachable``/``timeout``/``bad_response``."""

    def __init__(self, verb: str, resource: Resource, ref: ObjectRef, code: int | str, message: str) -> None:
        self.verb, self.resource, self.ref, self.code = verb, resource, ref, code
        self.message = message
        super().__init__(message)

    @property
    def conflict(self) -> bool:
        return self.code == 409

    @property
    def gone(self) -> bool:
        return self.code == 410


def describe_object(resource: Resource, ref: ObjectRef) -> str:
    where = f" in namespace {ref.namespace}" if resource.namespaced else ""
    return f"{resource.plural}/{ref.name}{where}"


def forbidden_message(verb: str, resource: Resource, ref: ObjectRef, server_text: str) -> str:
    """The 403 line: what is missing and the rule that grants it. Pure."""
    kind = "Role" if resource.namespaced else "ClusterRole"
    return (f"forbidden: the API server refused to let this service account {verb} "
            f"{describe_object(resource, ref)}; grant it with a {kind} rule {{apiGroups: "
            f"[\"{resource.group}\"], resources: [\"{resource.plural}\"], resourceNames: [\"{ref.name}\"], "
            f"verbs: [\"{verb}\"]}} (server said: {server_text})")


def _status_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        text = body.get("message") or body.get("reason") or ""
    except (ValueError, AttributeError):
        text = response.text
    text = " ".join(str(text).split())
    return (text[:MAX_STATUS_TEXT] + "…") if len(text) > MAX_STATUS_TEXT else (text or response.reason_phrase)


class Client:
    """One API server connection pool; ``aclose`` it (``async with``)."""

    def __init__(self, cfg: ClusterConfig, metrics: Metrics | None = None, *,
                 timeout_s: float = REQUEST_TIMEOUT_S, watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.watch_timeout_s = watch_timeout_s
        self._http = httpx.AsyncClient(base_url=cfg.server, verify=cfg.ssl_context(),
                                       timeout=httpx.Timeout(timeout_s), trust_env=False,
                                       headers={"Accept": "application/json",
                                                "User-Agent": "tlsproxy"})

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ errors
    def _fail(self, verb: str, resource: Resource, ref: ObjectRef, code: int | str, text: str, *,
              quiet: bool = False) -> APIError:
        what = describe_object(resource, ref)
        if code == 403:
            message = forbidden_message(verb, resource, ref, text)
        elif code == 401:
            message = (f"unauthorized: the API server {self.cfg.server} refused the credentials from "
                       f"{self.cfg.source or 'the kubeconfig'} ({text})")
        elif code == 404:
            message = f"{what} does not exist"
        elif code == 409:
            message = f"conflict: {what} changed since it was read ({text})"
        elif code == 410:
            message = f"gone: the watch of {what} asked for a resourceVersion the server no longer has"
        elif code == "unreachable":
            message = f"cannot reach the API server {self.cfg.server}: {text}"
        elif code == "timeout":
            message = f"no answer from the API server {self.cfg.server} within {self.timeout_s:g}s ({text})"
        else:
            message = f"{verb} {what}: {code} {text}"
        if self.metrics is not None:
            self.metrics.k8s_api_errors.labels(verb, str(code)).inc()
        level = log.info if quiet else (log.error if code in (401, 403) else log.warning)
        level("kubernetes API error", verb=verb, object=what, code=code, reason=message)
        return APIError(verb, resource, ref, code, message)

    async def _request(self, verb: str, method: str, resource: Resource, ref: ObjectRef, *,
                       json_body: Any = None, content_type: str | None = None,
                       quiet_codes: tuple[int, ...] = ()) -> dict:
        url = resource.path(ref)
        content = None if json_body is None else json.dumps(json_body).encode()
        for attempt in (1, 2):
            headers = self._headers(fresh=attempt == 2)
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = await self._http.request(method, url, content=content, headers=headers)
            except httpx.TimeoutException as exc:
                raise self._fail(verb, resource, ref, "timeout", type(exc).__name__) from None
            except httpx.TransportError as exc:
                raise self._fail(verb, resource, ref, "unreachable", str(exc) or type(exc).__name__) from None
            if response.status_code == 401 and attempt == 1 and self.cfg.token_file is not None:
                continue          # the token may have rotated under us: re-read it and try once more
            break
        if response.status_code >= 400:
            raise self._fail(verb, resource, ref, response.status_code, _status_text(response),
                             quiet=response.status_code in quiet_codes)
        try:
            body = response.json()
        except ValueError:
            raise self._fail(verb, resource, ref, "bad_response", "the answer is not JSON") from None
        if not isinstance(body, dict):
            raise self._fail(verb, resource, ref, "bad_response", "the answer is not a JSON object")
        return body

    def _headers(self, *, fresh: bool = False) -> dict[str, str]:
        token = self.cfg.bearer(fresh=fresh)
        return {"Authorization": f"Bearer {token}"} if token else {}

    # ------------------------------------------------------------------ verbs
    async def get(self, resource: Resource, ref: ObjectRef) -> dict:
        return await self._request("get", "GET", resource, ref)

    async def update(self, resource: Resource, ref: ObjectRef, obj: dict) -> dict:
        """PUT; ``obj.metadata.resourceVersion`` makes it conditional (409 when the object moved on)."""
        return await self._request("update", "PUT", resource, ref, json_body=obj, quiet_codes=(409,))

    async def patch(self, resource: Resource, ref: ObjectRef, patch: dict,
                    content_type: str = STRATEGIC_MERGE_PATCH) -> dict:
        return await self._request("patch", "PATCH", resource, ref, json_body=patch,
                                   content_type=content_type, quiet_codes=(409,))

    async def watch(self, resource: Resource, ref: ObjectRef, resource_version: str,
                    on_event: Callable[[dict], Awaitable[None]]) -> None:
        """Stream watch events of one object (by ``fieldSelector=metadata.name``) from
        ``resource_version`` with bookmarks, calling ``on_event`` for each. Returns when the server
        ends the stream (its timeout); raises APIError (410 included, as an ``ERROR`` event or a
        status) otherwise."""
        params = {"watch": "1", "fieldSelector": f"metadata.name={ref.name}",
                  "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_timeout_s)}
        timeout = httpx.Timeout(self.timeout_s, read=self.watch_timeout_s + WATCH_READ_GRACE_S)
        try:
            async with self._http.stream("GET", resource.collection(ref), params=params,
                                         headers=self._headers(), timeout=timeout) as response:
                if response.status_code >= 400:
                    await response.aread()
                    if response.status_code == 401:
                        self.cfg.bearer(fresh=True)
                    raise self._fail("watch", resource, ref, response.status_code, _status_text(response),
                                     quiet=response.status_code == 410)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise self._fail("watch", resource, ref, "bad_response",
                                         "a watch event is not JSON") from None
                    if not isinstance(event, dict):
                        raise self._fail("watch", resource, ref, "bad_response", "a watch event is not "
                                         "a JSON object")
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        code = status.get("code") if isinstance(status.get("code"), int) else "error"
                        raise self._fail("watch", resource, ref, code, str(status.get("message") or ""),
                                         quiet=code == 410)
                    await on_event(event)
        except httpx.TimeoutException as exc:
            raise self._fail("watch", resource, ref, "timeout", type(exc).__name__) from None
        except httpx.TransportError as exc:
            raise self._fail("watch", resource, ref, "unreachable", str(exc) or type(exc).__name__) from None
