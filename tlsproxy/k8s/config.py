"""Where the Kubernetes API server is and how to authenticate: in-cluster, or a kubeconfig.

In a pod (``KUBERNETES_SERVICE_HOST`` set) the service account's projected volume gives the token,
the cluster CA and the namespace. The kubelet rotates the token file (at 80 % of its lifetime, one
hour by default), so the token is never cached for long: :class:`TokenFile` re-reads it every
``TOKEN_REREAD_S`` and at once after a 401, as client-go does.

Outside a cluster, ``--kubeconfig`` or ``$KUBECONFIG`` (the first file of the list) names a
kubeconfig; the subset read is the current context's cluster (``server``, ``certificate-authority``
or ``-data``, ``insecure-skip-tls-verify`` is refused) and user (``token``, ``tokenFile``,
``client-certificate``/``client-key`` or their ``-data``), and the context's ``namespace``.
Anything else there (exec plugins, auth providers) is a one-line error naming it.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ObjectRef, parse_object_ref  # noqa: F401 - re-exported for the k8s unit
from ..errors import ConfigError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 60.0        # client-go re-reads a service-account token file every minute


class TokenFile:
    """A bearer token read from a file and re-read as the kubelet rotates it."""

    def __init__(self, path: Path, reread_s: float = TOKEN_REREAD_S) -> None:
        self.path = path
        self.reread_s = reread_s
        self._token: str | None = None
        self._read_at = 0.0

    def get(self, *, fresh: bool = False) -> str:
        now = time.monotonic()
        if fresh or self._token is None or now - self._read_at >= self.reread_s:
            try:
                token = self.path.read_text().strip()
            except OSError as exc:
                if self._token is not None:      # keep the last one; the next request retries
                    return self._token
                raise ConfigError(f"Kubernetes token {self.path}: {exc.strerror or exc}") from None
            self._token, self._read_at = token, now
        assert self._token is not None
        return self._token


@dataclass(frozen=True)
class ClusterConfig:
    """How to reach one API server. ``token``/``token_file``: bearer auth; ``client_cert``: TLS auth."""

    server: str                               # https://HOST:PORT
    ca_pem: bytes | None = None               # None: the system trust store
    token: str | None = None
    token_file: TokenFile | None = field(default=None, compare=False)
    client_cert: tuple[Path, Path] | None = None
    namespace: str = "default"                # the default namespace of NAME without NAMESPACE/
    source: str = ""                          # "in-cluster" or the kubeconfig path, for log lines

    def bearer(self, *, fresh: bool = False) -> str | None:
        if self.token_file is not None:
            return self.token_file.get(fresh=fresh)
        return self.token

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.ca_pem is not None:
            ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii", "replace"))
        if self.client_cert is not None:
            ctx.load_cert_chain(str(self.client_cert[0]), str(self.client_cert[1]))
        return ctx


def in_cluster(env: Mapping[str, str], sa_dir: Path = SA_DIR) -> ClusterConfig:
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = env.get("KUBERNETES_SERVICE_PORT", "443").strip() or "443"
    if not host:
        raise ConfigError("not in a cluster: KUBERNETES_SERVICE_HOST is not set (give --kubeconfig "
                          "or set KUBECONFIG)")
    try:
        ca = (sa_dir / "ca.crt").read_bytes()
    except OSError as exc:
        raise ConfigError(f"in-cluster: cannot read {sa_dir / 'ca.crt'}: {exc.strerror or exc} (is a "
                          "service account token mounted? automountServiceAccountToken)") from None
    token = TokenFile(sa_dir / "token")
    token.get()          # fail now, with the path, when there is none
    try:
        namespace = (sa_dir / "namespace").read_text().strip() or "default"
    except OSError:
        namespace = "default"
    shown = f"[{host}]" if ":" in host else host
    return ClusterConfig(f"https://{shown}:{port}", ca, token_file=token, namespace=namespace,
                         source="in-cluster")


def _data_or_file(entry: Mapping, key: str, base: Path, where: str) -> bytes | None:
    if entry.get(f"{key}-data"):
        try:
            return base64.b64decode(str(entry[f"{key}-data"]), validate=True)
        except ValueError:
            raise ConfigError(f"{where}: {key}-data is not base64") from None
    if entry.get(key):
        path = Path(str(entry[key]))
        path = path if path.is_absolute() else base / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: {key} {path}: {exc.strerror or exc}") from None
    return None


def _named(items: object, name: str, what: str, where: str) -> Mapping:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(what), dict):
            return item[what]
    raise ConfigError(f"{where}: no {what} named {name!r}")


def from_kubeconfig(path: Path) -> ClusterConfig:
    where = f"kubeconfig {path}"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where}: not valid YAML") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not a kubeconfig (a mapping with clusters, users, contexts)")
    current = doc.get("current-context")
    if not current:
        raise ConfigError(f"{where}: no current-context")
    context = _named(doc.get("contexts"), current, "context", where)
    cluster = _named(doc.get("clusters"), context.get("cluster"), "cluster", where)
    user = _named(doc.get("users"), context.get("user"), "user", where) if context.get("user") else {}
    server = str(cluster.get("server") or "")
    if not server.startswith("https://"):
        raise ConfigError(f"{where}: cluster server {server!r} must be an https:// URL")
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError(f"{where}: insecure-skip-tls-verify is refused: give certificate-authority")
    for unsupported in ("exec", "auth-provider", "username"):
        if user.get(unsupported):
            raise ConfigError(f"{where}: user {context.get('user')!r} uses {unsupported}, which tlsproxy "
                              "does not support (use a token, tokenFile or a client certificate)")
    base = path.parent
    ca = _data_or_file(cluster, "certificate-authority", base, where)
    token_file = None
    if user.get("tokenFile"):
        tf = Path(str(user["tokenFile"]))
        token_file = TokenFile(tf if tf.is_absolute() else base / tf)
    client_cert = None
    cert = _data_or_file(user, "client-certificate", base, where)
    key = _data_or_file(user, "client-key", base, where)
    if (cert is None) != (key is None):
        raise ConfigError(f"{where}: client-certificate and client-key go together")
    if cert is not None and key is not None:
        client_cert = _private_pair(cert, key)
    return ClusterConfig(server.rstrip("/"), ca, token=str(user["token"]) if user.get("token") else None,
                         token_file=token_file, client_cert=client_cert,
                         namespace=str(context.get("namespace") or "default"), source=str(path))


def _private_pair(cert: bytes, key: bytes) -> tuple[Path, Path]:
    """ssl loads a client certificate from files only: write the pair to a private directory."""
    d = Path(tempfile.mkdtemp(prefix="tlsproxy-kube-"))
    out = []
    for name, data in (("client.crt", cert), ("client.key", key)):
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        out.append(d / name)
    return out[0], out[1]


def discover(kubeconfig: Path | None = None, env: Mapping[str, str] | None = None,
             sa_dir: Path = SA_DIR) -> ClusterConfig:
    """``--kubeconfig``, else ``$KUBECONFIG`` (its first file), else in-cluster. Raises ConfigError."""
    env = os.environ if env is None else env
    if kubeconfig is None and env.get("KUBECONFIG"):
        first = next((p for p in env["KUBECONFIG"].split(os.pathsep) if p.strip()), "")
        kubeconfig = Path(first).expanduser() if first else None
    if kubeconfig is not None:
        return from_kubeconfig(kubeconfig)
    return in_cluster(env, sa_dir)
