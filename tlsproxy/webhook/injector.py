"""Pod → JSON Patch: the one injection policy, shared by the webhook and ``tlsproxy inject``.

Theory of operation. :func:`decide` is pure: it reads a Pod (or a pod template: ``metadata`` + ``spec``)
and returns exactly one of three values:

- :class:`Injected` — the JSON Patch (RFC 6902) operations that add the ``tlsproxy`` container, its
  Secret volume(s) and the ``tlsproxy.io/status: injected`` annotation;
- :class:`Skipped` — nothing to do, with a reason (not asked, opted out, already injected, hostNetwork);
- :class:`Denied` — an annotation is wrong; the reason names it. A pod the proxy cannot protect
  correctly is refused rather than created broken.

Every patch is written against what API servers really send: parents that may be absent
(``/metadata/annotations``, ``/spec/initContainers``, ``/spec/volumes``) are created whole instead of
appended to, and keys are escaped per RFC 6901 (``/`` → ``~1``). :func:`apply_patch` applies our own
(``add``-only) patches, so the offline ``inject`` command edits manifests through the same operations
the API server would apply.

The proxy container's arguments are ``tlsproxy serve`` flags; a test feeds them to the real ``serve``
parser so the two cannot drift.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..config import parse_alpn, parse_hostport, parse_object_ref, parse_url

PREFIX = "tlsproxy.io/"
A_INJECT = PREFIX + "inject"
A_STATUS = PREFIX + "status"
A_NATIVE = PREFIX + "native-sidecar"
A_UPSTREAM_PORT = PREFIX + "upstream-port"
A_PORT = PREFIX + "port"
A_ADMIN_PORT = PREFIX + "admin-port"
A_SECRET = PREFIX + "secret"
A_PROTOCOL = PREFIX + "protocol"
A_ALPN = PREFIX + "alpn"
A_HTTP_PORT = PREFIX + "http-port"
A_HTTP_MODE = PREFIX + "http-mode"
A_CLIENT_CA = PREFIX + "client-ca"
A_REQUIRE_CLIENT_CERT = PREFIX + "require-client-cert"
A_ALLOW = {kind: PREFIX + f"allow-{kind}" for kind in ("uri", "dns", "cn", "ou")}
A_OUTBOUND = PREFIX + "outbound"
A_LOG_LEVEL = PREFIX + "log-level"
A_PROVISION = PREFIX + "provision-secret"          # "true": fill/renew the Secret through the API
A_SERVICE = PREFIX + "service"                     # Services named in a provisioned certificate
A_OUTBOUND_CA_SECRET = PREFIX + "outbound-ca-secret"
A_OUTBOUND_CERT_SECRET = PREFIX + "outbound-cert-secret"
A_RESOURCES = {
    ("requests", "cpu"): PREFIX + "cpu-request",
    ("requests", "memory"): PREFIX + "memory-request",
    ("limits", "cpu"): PREFIX + "cpu-limit",
    ("limits", "memory"): PREFIX + "memory-limit",
}
KNOWN_ANNOTATIONS = frozenset({
    A_INJECT, A_STATUS, A_NATIVE, A_UPSTREAM_PORT, A_PORT, A_ADMIN_PORT, A_SECRET, A_PROTOCOL,
    A_HTTP_PORT, A_HTTP_MODE, A_CLIENT_CA, A_REQUIRE_CLIENT_CERT, A_OUTBOUND, A_LOG_LEVEL, A_ALPN,
    A_PROVISION, A_SERVICE, A_OUTBOUND_CA_SECRET, A_OUTBOUND_CERT_SECRET,
    *A_ALLOW.values(), *A_RESOURCES.values(),
})

STATUS_INJECTED = "injected"
CONTAINER_NAME = "tlsproxy"
TLS_VOLUME = "tlsproxy-tls"
CLIENT_CA_VOLUME = "tlsproxy-client-ca"
TLS_MOUNT = "/etc/tlsproxy/tls"             # the Secret directory: kubelet swaps ..data, we watch the dir
CLIENT_CA_MOUNT = "/etc/tlsproxy/client-ca"
KUBE_API_VOLUME = "tlsproxy-kube-api"
# The standard place of a service-account token: the in-cluster configuration reads it there. The
# ServiceAccount admission plugin runs before webhooks, so it never mounts a token into a container a
# webhook adds: the sidecar gets its own projected token (rotated by the kubelet, re-read by tlsproxy).
KUBE_API_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBE_TOKEN_SECONDS = 3607                   # the kubelet's own default for projected tokens
OUTBOUND_CERT_VOLUME = "tlsproxy-outbound-tls"
OUTBOUND_CERT_MOUNT = "/etc/tlsproxy/outbound"
DEFAULT_PORT = 9443                         # the same default as `serve --listen`
DEFAULT_ADMIN_PORT = 9901                   # the same default as `serve --admin`
DEFAULT_UPSTREAM_PORT = 8080                # `serve`'s own default upstream, when the pod declares no port
RUN_AS = 65532                              # the "nonroot" uid of distroless images; the Dockerfile's user
# Requests sized for an idle sidecar (a few MiB of Python + buffers); the memory limit keeps a leak
# from starving the app. No CPU limit by default: CFS throttling adds tail latency to every request.
DEFAULT_RESOURCES = {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}}

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_ON = {"true": True, "false": False}


def default_image() -> str:
    return f"tlsproxy:{__version__}"


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """What the operator chooses once (flags of ``webhook``/``inject``), not per pod."""

    image: str = field(default_factory=default_image)
    image_pull_policy: str = "IfNotPresent"


DEFAULT_OPTIONS = InjectOptions()


@dataclass(frozen=True, slots=True)
class Injected:
    patch: tuple[dict[str, Any], ...]
    container: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Skipped:
    reason: str
    asked: bool = False     # the pod asked for injection explicitly (worth a warning to the user)


@dataclass(frozen=True, slots=True)
class Denied:
    reason: str


Decision = Injected | Skipped | Denied


class _Invalid(Exception):
    """An annotation value that cannot be used; the message names the annotation."""


# ---------------------------------------------------------------------------- the policy

def decide(pod: Mapping[str, Any], *, namespace_default: bool,
           options: InjectOptions = DEFAULT_OPTIONS) -> Decision:
    """Decide what to do with one pod. ``namespace_default``: the namespace opted in with its label."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    wanted = annotations.get(A_INJECT)
    if wanted is not None and wanted not in ("enabled", "disabled"):
        return Denied(f'annotation {A_INJECT}: "{wanted}" must be "enabled" or "disabled"')
    if wanted == "disabled":
        return Skipped(f"{A_INJECT} is disabled")
    if wanted is None and not namespace_default:
        return Skipped(f"no {A_INJECT} annotation and the namespace does not inject by default")
    asked = wanted == "enabled"
    if annotations.get(A_STATUS) == STATUS_INJECTED:
        return Skipped(f"already injected ({A_STATUS}: {STATUS_INJECTED})", asked)
    all_containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if any(c.get("name") == CONTAINER_NAME for c in all_containers):
        return Skipped(f"already has a container named {CONTAINER_NAME}", asked)
    if spec.get("hostNetwork"):
        return Skipped("hostNetwork pods share the node's ports; the sidecar would collide there", asked)
    try:
        container, volumes = _build(annotations, spec, options)
    except _Invalid as exc:
        return Denied(str(exc))
    existing = {v.get("name") for v in spec.get("volumes") or []}
    for volume in volumes:
        if volume["name"] in existing:
            # A leftover of a hand-written sidecar; replacing it could change what the app sees.
            return Denied(f"the pod already has a volume named {volume['name']}; remove it or set "
                          f"{A_INJECT}: disabled")
    ops = _patch("metadata" in pod, metadata, spec, container, volumes, _is_native(annotations))
    return Injected(tuple(ops), container)


def _is_native(annotations: Mapping[str, str]) -> bool:
    return _boolean(annotations, A_NATIVE, True)


def _build(annotations: Mapping[str, str], spec: Mapping[str, Any],
           options: InjectOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    unknown = sorted(k for k in annotations if k.startswith(PREFIX) and k not in KNOWN_ANNOTATIONS)
    if unknown:
        raise _Invalid(f"unknown annotation {unknown[0]} (see docs/annotations.md for the known ones)")
    _is_native(annotations)  # validate early, so the message names it even if nothing else is wrong
    port = _port(annotations, A_PORT, DEFAULT_PORT)
    admin_port = _port(annotations, A_ADMIN_PORT, DEFAULT_ADMIN_PORT)
    app_ports = _declared_ports(spec)
    upstream_port = _port(annotations, A_UPSTREAM_PORT, _default_upstream(spec, {port, admin_port}))
    protocol = _choice(annotations, A_PROTOCOL, ("http", "tcp"), "http")
    secret = _name(annotations, A_SECRET, f"{spec.get('serviceAccountName') or 'default'}-tls")

    taken: dict[int, str] = {}
    _claim(taken, port, f"the TLS port ({A_PORT})", app_ports)
    _claim(taken, admin_port, f"the admin port ({A_ADMIN_PORT})", app_ports)
    if upstream_port in taken:
        raise _Invalid(f"annotation {A_UPSTREAM_PORT}: {upstream_port} is also {taken[upstream_port]}")

    args = ["serve", "--listen", f":{port}", "--upstream", f"{protocol}://127.0.0.1:{upstream_port}",
            "--admin", f":{admin_port}", "--cert-dir", TLS_MOUNT, "--log-format", "json"]
    if protocol != "http":
        args += ["--protocol", protocol]
    if A_ALPN in annotations:
        if protocol != "tcp":
            raise _Invalid(f"annotation {A_ALPN} needs {A_PROTOCOL}: tcp (HTTP mode always offers http/1.1)")
        try:
            alpn = parse_alpn(annotations[A_ALPN])
        except ValueError as exc:
            raise _Invalid(f"annotation {A_ALPN}: {exc}") from None
        if alpn:
            args += ["--alpn", ",".join(alpn)]
    if A_LOG_LEVEL in annotations:
        args += ["--log-level", _choice(annotations, A_LOG_LEVEL, ("debug", "info", "warning", "error"),
                                        "info")]
    ports = [{"name": "https", "containerPort": port, "protocol": "TCP"},
             {"name": "tlsproxy-admin", "containerPort": admin_port, "protocol": "TCP"}]

    http_mode = annotations.get(A_HTTP_MODE)
    if A_HTTP_PORT in annotations:
        http_port = _port(annotations, A_HTTP_PORT, 0)
        _claim(taken, http_port, f"the plain-HTTP port ({A_HTTP_PORT})", app_ports)
        args += ["--http-listen", f":{http_port}",
                 "--http-mode", _choice(annotations, A_HTTP_MODE, ("redirect", "forward", "off"), "redirect")]
        ports.append({"name": "http", "containerPort": http_port, "protocol": "TCP"})
    elif http_mode is not None:
        raise _Invalid(f"annotation {A_HTTP_MODE} needs {A_HTTP_PORT} (the plain-HTTP port to listen on)")

    provision = _boolean(annotations, A_PROVISION, False)
    if provision:
        # the Secret is read, filled and followed through the API, not mounted (k8s/secrets.py)
        args[args.index("--cert-dir"):args.index("--cert-dir") + 2] = ["--provision-secret", secret]
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        for service in _list(annotations, A_SERVICE) if A_SERVICE in annotations else ():
            if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", service):
                raise _Invalid(f'annotation {A_SERVICE}: "{service}" is not a Service name')
            args += ["--provision-service", service]
    else:
        if A_SERVICE in annotations:
            raise _Invalid(f'annotation {A_SERVICE} names the provisioned certificate: it needs '
                           f'{A_PROVISION}: "true"')
        volumes = [{"name": TLS_VOLUME, "secret": {"secretName": secret}}]
        # No subPath: a subPath mount is a bind of one file at start and never sees a rotated Secret.
        mounts = [{"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}]
    if A_OUTBOUND_CA_SECRET in annotations:
        try:      # NAME (the pod's namespace) or NAMESPACE/NAME: the peer's Secret may live elsewhere
            ref = parse_object_ref(annotations[A_OUTBOUND_CA_SECRET])
        except ValueError as exc:
            raise _Invalid(f"annotation {A_OUTBOUND_CA_SECRET}: {exc}") from None
        args += ["--outbound-ca-secret", str(ref)]
    if A_OUTBOUND_CERT_SECRET in annotations:
        volumes.append({"name": OUTBOUND_CERT_VOLUME,
                        "secret": {"secretName": _name(annotations, A_OUTBOUND_CERT_SECRET, "")}})
        mounts.append({"name": OUTBOUND_CERT_VOLUME, "mountPath": OUTBOUND_CERT_MOUNT, "readOnly": True})
        args += ["--outbound-cert-dir", OUTBOUND_CERT_MOUNT]
    if provision or A_OUTBOUND_CA_SECRET in annotations:
        volumes.append(_kube_api_volume())
        mounts.append({"name": KUBE_API_VOLUME, "mountPath": KUBE_API_MOUNT, "readOnly": True})
    # Mutual TLS: a CA from a ConfigMap (tlsproxy.io/client-ca), or the ca.crt that cert-manager puts
    # in the serving Secret itself (tlsproxy.io/require-client-cert: "true").
    mtls = False
    if A_CLIENT_CA in annotations:
        ca = _name(annotations, A_CLIENT_CA, "")
        volumes.append({"name": CLIENT_CA_VOLUME, "configMap": {"name": ca}})
        mounts.append({"name": CLIENT_CA_VOLUME, "mountPath": CLIENT_CA_MOUNT, "readOnly": True})
        args += ["--client-ca", f"{CLIENT_CA_MOUNT}/ca.crt"]
        mtls = True
        if A_REQUIRE_CLIENT_CERT in annotations and not _boolean(annotations, A_REQUIRE_CLIENT_CERT, True):
            raise _Invalid(f'annotation {A_REQUIRE_CLIENT_CERT}: "false" contradicts {A_CLIENT_CA}, which '
                           "always requires a client certificate")
    elif _boolean(annotations, A_REQUIRE_CLIENT_CERT, False):
        args += ["--require-client-cert", "on"]
        mtls = True
    for kind, key in A_ALLOW.items():
        if key not in annotations:
            continue
        if not mtls:
            raise _Invalid(f"annotation {key} needs mutual TLS: peers are identified by client "
                           f'certificates; set {A_CLIENT_CA} or {A_REQUIRE_CLIENT_CERT}: "true"')
        for value in _list(annotations, key):
            if kind == "dns" and not _DNS_NAME.match(value):
                raise _Invalid(f'annotation {key}: "{value}" is not a DNS name')
            if kind == "uri" and ("://" not in value or any(ch.isspace() for ch in value)):
                raise _Invalid(f'annotation {key}: "{value}" is not a URI (e.g. spiffe://cluster.local/ns/'
                               'default/sa/web)')
            args += [f"--allow-{kind}", value]
    for entry in _list(annotations, A_OUTBOUND) if A_OUTBOUND in annotations else ():
        listen, outbound_port = _outbound(entry)
        _claim(taken, outbound_port, f"an outbound listener ({A_OUTBOUND})", app_ports)
        args += ["--outbound", f"{listen}={entry.split('=', 1)[1].strip()}"]

    container = {
        "name": CONTAINER_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": args,
        "ports": ports,
        "volumeMounts": mounts,
        "resources": _resources(annotations),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Startup gates the app: for a native sidecar the kubelet starts the next container only after
        # this probe succeeds, so the app never receives traffic the proxy cannot yet serve.
        # The app starts only once this passes (native sidecar), so it must not wait for the app.
        "startupProbe": _probe("/readyz?exclude=upstream", admin_port, period_s=1, failures=120),
        "livenessProbe": _probe("/healthz", admin_port, period_s=10, failures=3),
        "readinessProbe": _probe("/readyz", admin_port, period_s=5, failures=2),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if _is_native(annotations):
        container["restartPolicy"] = "Always"
    return container, volumes


def _kube_api_volume() -> dict[str, Any]:
    """What the ServiceAccount admission plugin mounts (kube-api-access-*), for the sidecar alone."""
    return {"name": KUBE_API_VOLUME, "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": KUBE_TOKEN_SECONDS}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}


def _patch(has_metadata: bool, metadata: Mapping[str, Any], spec: Mapping[str, Any],
           container: dict[str, Any], volumes: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    if native:
        # First init container: init containers start in order, so every later one can use the proxy.
        if spec.get("initContainers"):
            ops.append(_add("/spec/initContainers/0", container))
        else:
            ops.append(_add("/spec/initContainers", [container]))
    else:
        # Classic sidecar: first in the list, so the kubelet starts it before the app.
        if spec.get("containers"):
            ops.append(_add("/spec/containers/0", container))
        else:
            ops.append(_add("/spec/containers", [container]))
    if spec.get("volumes"):
        ops += [_add("/spec/volumes/-", v) for v in volumes]
    else:
        ops.append(_add("/spec/volumes", list(volumes)))
    if not has_metadata:
        ops.append(_add("/metadata", {"annotations": {A_STATUS: STATUS_INJECTED}}))
    elif metadata.get("annotations"):
        ops.append(_add("/metadata/annotations/" + escape(A_STATUS), STATUS_INJECTED))
    else:
        ops.append(_add("/metadata/annotations", {A_STATUS: STATUS_INJECTED}))
    return ops


def _add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": copy.deepcopy(value)}


def escape(key: str) -> str:
    """RFC 6901: ``~`` → ``~0`` then ``/`` → ``~1``."""
    return key.replace("~", "~0").replace("/", "~1")


def _probe(path: str, port: int, *, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTP"}, "periodSeconds": period_s,
            "failureThreshold": failures, "timeoutSeconds": 1}


# ---------------------------------------------------------------------------- annotation readers

def _port(annotations: Mapping[str, str], key: str, default: int) -> int:
    raw = annotations.get(key)
    if raw is None:
        return default
    text = str(raw).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _Invalid(f'annotation {key}: "{raw}" is not a port number (1-65535)')
    return int(text)


def _choice(annotations: Mapping[str, str], key: str, allowed: Sequence[str], default: str) -> str:
    raw = annotations.get(key)
    if raw is None:
        return default
    if raw not in allowed:
        raise _Invalid(f'annotation {key}: "{raw}" must be one of {", ".join(allowed)}')
    return raw


def _boolean(annotations: Mapping[str, str], key: str, default: bool) -> bool:
    raw = annotations.get(key)
    if raw is None:
        return default
    if str(raw).lower() not in _ON:
        raise _Invalid(f'annotation {key}: "{raw}" must be "true" or "false"')
    return _ON[str(raw).lower()]


def _name(annotations: Mapping[str, str], key: str, default: str) -> str:
    raw = annotations.get(key, default)
    if len(raw) > 253 or not _DNS1123_SUBDOMAIN.match(raw):
        raise _Invalid(f'annotation {key}: "{raw}" is not a valid object name (lowercase DNS-1123)')
    return raw


def _list(annotations: Mapping[str, str], key: str) -> list[str]:
    items = [x.strip() for x in str(annotations[key]).split(",") if x.strip()]
    if not items:
        raise _Invalid(f"annotation {key} is empty")
    return items


def _outbound(entry: str) -> tuple[str, int]:
    """``PORT=https://peer:443`` or ``HOST:PORT=URL`` → (listen address, port). A bare port binds loopback
    only: the plain side of an outbound listener must never be reachable from other pods."""
    listen, sep, url = entry.partition("=")
    if not sep:
        raise _Invalid(f'annotation {A_OUTBOUND}: "{entry}" is not LISTEN=URL (e.g. 15001=https://api:443)')
    listen = listen.strip()
    try:
        addr = parse_hostport(f"127.0.0.1:{listen}" if listen.isdigit() else listen)
        parse_url(url, ("https", "tls"))
    except ValueError as exc:
        raise _Invalid(f"annotation {A_OUTBOUND}: {exc}") from None
    if addr.port == 0:
        raise _Invalid(f'annotation {A_OUTBOUND}: "{entry}" needs a fixed port for the app to call')
    return str(addr), addr.port


def _resources(annotations: Mapping[str, str]) -> dict[str, Any]:
    out = copy.deepcopy(DEFAULT_RESOURCES)
    for (section, resource), key in A_RESOURCES.items():
        if key in annotations:
            raw = str(annotations[key]).strip()
            if not _QUANTITY.match(raw):
                raise _Invalid(f'annotation {key}: "{raw}" is not a quantity (e.g. 100m, 64Mi)')
            out.setdefault(section, {})[resource] = raw
    return out


def _declared_ports(spec: Mapping[str, Any]) -> dict[int, str]:
    """containerPort → owning container, over every container of the pod."""
    out: dict[int, str] = {}
    for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for p in c.get("ports") or []:
            if isinstance(p.get("containerPort"), int):
                out.setdefault(p["containerPort"], str(c.get("name", "?")))
    return out


def _default_upstream(spec: Mapping[str, Any], ours: set[int]) -> int:
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("protocol", "TCP") == "TCP" and p.get("containerPort") not in ours:
                return int(p["containerPort"])
    return DEFAULT_UPSTREAM_PORT


def _claim(taken: dict[int, str], port: int, what: str, app_ports: Mapping[int, str]) -> None:
    if port in app_ports:
        raise _Invalid(f"port {port} is {what} but container {app_ports[port]} already declares it; "
                       f"set {A_PORT}/{A_ADMIN_PORT} to a free port or move the app")
    if port in taken:
        raise _Invalid(f"port {port} is {what} and also {taken[port]}")
    taken[port] = what


# ---------------------------------------------------------------------------- applying our patches

def apply_patch(doc: dict[str, Any], ops: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Apply our ``add`` operations to a copy of ``doc`` (RFC 6902 semantics for ``add``)."""
    out = copy.deepcopy(doc)
    for op in ops:
        if op["op"] != "add":
            raise ValueError(f"unsupported op {op['op']}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target: Any = out
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        value = copy.deepcopy(op["value"])
        if isinstance(target, list):
            if last == "-":
                target.append(value)
            else:
                target.insert(int(last), value)
        else:
            target[last] = value
    return out
