"""A stand-in Kubernetes API server for the tests: real HTTPS on 127.0.0.1, bearer tokens, and the
two resources tlsproxy manages (Secrets, MutatingWebhookConfigurations) with the API's semantics.

It is NOT Kubernetes. What it models, as the API server documents it:

* ``GET`` of one object (404 Status when absent); ``PUT`` with ``metadata.resourceVersion`` (409
  Conflict when it is not the current one; without one the update is unconditional); ``PATCH`` as
  JSON merge patch (RFC 7386) or strategic merge patch (lists of webhooks merged by ``name``; a
  ``metadata.resourceVersion`` in the patch is a precondition, 409 when stale).
* Every change bumps one global resourceVersion (a counter, as etcd's revision) and is recorded.
* Watch: ``GET <collection>?watch=1&fieldSelector=metadata.name=N&resourceVersion=RV
  &allowWatchBookmarks=true&timeoutSeconds=S`` streams newline-delimited JSON events (chunked):
  ADDED/MODIFIED/DELETED after RV, a BOOKMARK (only ``metadata.resourceVersion``) every
  ``bookmark_interval_s``, and ends after S seconds. An RV older than the compacted history
  (:meth:`compact`) gets an ``ERROR`` event with a 410 Expired Status, as a real API server sends.
* Authentication: ``Authorization: Bearer T`` for T in :attr:`tokens` (else 401); authorization: a
  (verb, resource, name) in :attr:`deny` gets the API server's 403 Status text.
* :meth:`stop` closes the listener *and every open connection* (the API server going away);
  :meth:`start` brings it back on the same port.

What it does not model: other resources, list, create/delete through the API, field managers,
admission, label selectors, etcd's own compaction timing, HTTP/2.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import yaml

from tlsproxy.certs import generate

SECRETS = "secrets"
MWC = "mutatingwebhookconfigurations"
_PREFIX = {SECRETS: "/api/v1", MWC: "/apis/admissionregistration.k8s.io/v1"}
_KIND = {SECRETS: ("Secret", "v1"), MWC: ("MutatingWebhookConfiguration", "admissionregistration.k8s.io/v1")}


def _status(code: int, reason: str, message: str, name: str = "", kind: str = "") -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {"name": name, "kind": kind}, "code": code}


def _merge(target, patch, strategic: bool):
    """RFC 7386 merge; with ``strategic``, lists of dicts with ``name`` merge item by item."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif (strategic and isinstance(value, list) and isinstance(out.get(key), list)
              and all(isinstance(v, dict) and "name" in v for v in value)):
            items = [copy.deepcopy(i) for i in out[key]]
            for v in value:
                hit = next((i for i, cur in enumerate(items) if cur.get("name") == v["name"]), None)
                if hit is None:
                    items.append(copy.deepcopy(v))
                else:
                    items[hit] = _merge(items[hit], v, strategic)
            out[key] = items
        else:
            out[key] = _merge(out.get(key), value, strategic)
    return out


class StandIn:
    def __init__(self, tmp: Path, *, bookmark_interval_s: float = 0.5, token: str = "test-token") -> None:
        self.tmp = tmp
        self.bookmark_interval_s = bookmark_interval_s
        self.tokens = {token}
        self.token = token
        self.deny: set[tuple[str, str, str]] = set()          # (verb, resource, name)
        self.expire_next_watch = False     # the next watch from a resourceVersion gets 410 (compacted)
        self.requests: list[tuple[str, str, int]] = []         # (method, path+query, status)
        self._lock = threading.Condition()
        self._rv = 100
        self._oldest = 0
        self._objects: dict[tuple[str, str, str], dict] = {}   # (resource, ns, name) -> object
        self._history: list[tuple[int, tuple[str, str, str], str, dict]] = []
        self._conns: set[socket.socket] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.running = False
        self.ca = generate.make_ca("stand-in API server CA")
        leaf = generate.issue(self.ca, "kubernetes", dns=("localhost",), ips=("127.0.0.1",))
        (tmp / "apiserver.crt").write_bytes(leaf.cert_pem)
        (tmp / "apiserver.key").write_bytes(leaf.key_pem)
        (tmp / "apiserver-ca.crt").write_bytes(self.ca.cert_pem)
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(tmp / "apiserver.crt", tmp / "apiserver.key")

    # ------------------------------------------------------------------ life
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> StandIn:
        standin = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def finish_request(self, request, client_address):
                try:
                    request.settimeout(30)
                    tls = standin._ctx.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                with standin._lock:
                    standin._conns.add(tls)
                try:
                    self.RequestHandlerClass(tls, client_address, self)
                except (OSError, ssl.SSLError):
                    pass
                finally:
                    with standin._lock:
                        standin._conns.discard(tls)
                    try:
                        tls.close()
                    except OSError:
                        pass

        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = Server(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.running = True
        return self

    def stop(self) -> None:
        """The API server goes away: no listener, every connection (watches too) cut."""
        if self._server is None:
            return
        self.running = False
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._lock.notify_all()
        self._server = None

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kubeconfig(self, path: Path | None = None, *, token: str | None = None,
                   namespace: str = "default") -> Path:
        path = path or self.tmp / "kubeconfig"
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
               "clusters": [{"name": "standin", "cluster": {
                   "server": self.url,
                   "certificate-authority-data": base64.b64encode(self.ca.cert_pem).decode()}}],
               "users": [{"name": "tlsproxy", "user": {"token": token or self.token}}],
               "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tlsproxy",
                                                            "namespace": namespace}}]}
        path.write_text(yaml.safe_dump(doc))
        return path

    # ------------------------------------------------------------------ objects (as kubectl would)
    def _record(self, key, kind: str, obj: dict) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[key] = obj
        self._history.append((self._rv, key, kind, copy.deepcopy(obj)))
        self._lock.notify_all()
        return copy.deepcopy(obj)

    def put(self, resource: str, namespace: str, name: str, body: dict) -> dict:
        """Create or replace an object unconditionally (``kubectl apply``/``edit``)."""
        key = (resource, namespace, name)
        with self._lock:
            obj = copy.deepcopy(body)
            kind, api = _KIND[resource]
            obj.update(kind=kind, apiVersion=api)
            meta = obj.setdefault("metadata", {})
            meta.update(name=name, **({"namespace": namespace} if namespace else {}))
            old = self._objects.get(key)
            meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
            return self._record(key, "MODIFIED" if old else "ADDED", obj)

    def put_secret(self, namespace: str, name: str, data: dict[str, bytes] | None = None,
                   type_: str | None = None) -> dict:
        """No ``data``: the empty Secret an installer ships (Opaque, no data: a kubernetes.io/tls
        Secret cannot be created empty)."""
        if not data:
            return self.put(SECRETS, namespace, name, {"type": type_ or "Opaque"})
        body = {"type": type_ or "kubernetes.io/tls",
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
        return self.put(SECRETS, namespace, name, body)

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes]:
        obj = self.get(SECRETS, namespace, name) or {}
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def compact(self) -> None:
        """Compact at the current revision: a watch started (or resumed) from an older
        resourceVersion gets 410 Gone; watches already streaming are not affected (the watch cache)."""
        with self._lock:
            self._oldest = self._rv

    def writes(self, resource: str = SECRETS) -> list[tuple[str, str, int]]:
        return [r for r in self.requests if r[0] in ("PUT", "PATCH") and f"/{resource}/" in r[1]]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    standin: StandIn

    def log_message(self, *args) -> None:
        pass

    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.standin.requests.append((self.command, self.path, code))

    def _route(self):
        parts = urlsplit(self.path)
        segs = [s for s in parts.path.split("/") if s]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if segs[:2] == ["api", "v1"] and len(segs) == 5 and segs[2] == "namespaces" \
                and segs[4] == SECRETS:
            return SECRETS, segs[3], None, query
        if segs[:2] == ["api", "v1"] and len(segs) == 6 and segs[2] == "namespaces" and segs[4] == SECRETS:
            return SECRETS, segs[3], segs[5], query
        if segs[:3] == ["apis", "admissionregistration.k8s.io", "v1"] and len(segs) in (4, 5) \
                and segs[3] == MWC:
            return MWC, "", segs[4] if len(segs) == 5 else None, query
        return None

    def _auth(self, verb: str, resource: str, namespace: str, name: str) -> bool:
        s = self.standin
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in s.tokens:
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return False
        if (verb, resource, name) in s.deny or (verb, resource, "*") in s.deny:
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            group = "" if resource == SECRETS else "admissionregistration.k8s.io"
            self._send_json(403, _status(403, "Forbidden", f'{resource} "{name}" is forbidden: User '
                                         f'"system:serviceaccount:test:tlsproxy" cannot {verb} resource '
                                         f'"{resource}" in API group "{group}"{where}', name, resource))
            return False
        return True

    def _read_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(n) if n else b""

    def _body(self) -> dict | None:
        try:
            body = json.loads(self._raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(400, _status(400, "BadRequest", "the body is not a JSON object"))
            return None
        return body

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return self._send_json(404, _status(404, "NotFound", "the server could not find the resource"))
        resource, ns, name, query = route
        if name is None:
            if query.get("watch") not in ("1", "true"):
                return self._send_json(405, _status(405, "MethodNotAllowed", "the stand-in lists nothing"))
            field = query.get("fieldSelector", "")
            if not field.startswith("metadata.name="):
                return self._send_json(400, _status(400, "BadRequest", "the stand-in watches one object "
                                                    "(fieldSelector=metadata.name=...)"))
            name = field.split("=", 1)[1]
            if self._auth("watch", resource, ns, name):
                self._watch((resource, ns, name), query)
            return None
        if not self._auth("get", resource, ns, name):
            return None
        obj = self.standin.get(resource, ns, name)
        if obj is None:
            return self._send_json(404, _status(404, "NotFound", f'{resource} "{name}" not found', name,
                                                resource))
        return self._send_json(200, obj)

    def do_PUT(self) -> None:
        self._read_body()          # always, so that a refusal leaves the connection usable
        route = self._route()
        if route is None or route[2] is None:
            return self._send_json(405, _status(405, "MethodNotAllowed", "PUT one object"))
        resource, ns, name, _q = route
        if not self._auth("update", resource, ns, name):
            return None
        body = self._body()
        if body is None:
            return None
        self._write(resource, ns, name, lambda current: body, body.get("metadata", {}).get("resourceVersion"))
        return None

    def do_PATCH(self) -> None:
        self._read_body()          # always, so that a refusal leaves the connection usable
        route = self._route()
        if route is None or route[2] is None:
            return self._send_json(405, _status(405, "MethodNotAllowed", "PATCH one object"))
        resource, ns, name, _q = route
        if not self._auth("patch", resource, ns, name):
            return None
        ctype = self.headers.get("Content-Type", "")
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return self._send_json(415, _status(415, "UnsupportedMediaType", f"cannot patch as {ctype}"))
        patch = self._body()
        if patch is None:
            return None
        strategic = ctype.startswith("application/strategic")
        self._write(resource, ns, name, lambda current: _merge(current, patch, strategic),
                    (patch.get("metadata") or {}).get("resourceVersion"))
        return None

    def _write(self, resource, ns, name, change, precondition) -> None:
        s = self.standin
        key = (resource, ns, name)
        with s._lock:
            current = s._objects.get(key)
            if current is None:
                return self._send_json(404, _status(404, "NotFound", f'{resource} "{name}" not found', name,
                                                    resource))
            if precondition and precondition != current["metadata"]["resourceVersion"]:
                text = (f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                        "modified; please apply your changes to the latest version and try again")
                return self._send_json(409, _status(409, "Conflict", text, name, resource))
            obj = copy.deepcopy(change(copy.deepcopy(current)))
            meta = obj.setdefault("metadata", {})
            meta.update(name=name, uid=current["metadata"]["uid"], **({"namespace": ns} if ns else {}))
            kind, api = _KIND[resource]
            obj.update(kind=kind, apiVersion=api)
            result = s._record(key, "MODIFIED", obj)
        return self._send_json(200, result)

    # ------------------------------------------------------------------ watch
    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, key, query) -> None:
        s = self.standin
        rv_text = query.get("resourceVersion", "")
        timeout = min(float(query.get("timeoutSeconds") or 1800), 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        s.requests.append(("GET", self.path, 200))
        end = time.monotonic() + timeout
        next_bookmark = time.monotonic() + s.bookmark_interval_s
        with s._lock:
            if rv_text in ("", "0"):
                cur = s._objects.get(key)
                pending = [("ADDED", copy.deepcopy(cur))] if cur else []
                rv = s._rv
            else:
                rv = int(rv_text)
                if rv < s._oldest or s.expire_next_watch:
                    s.expire_next_watch = False
                    pending = [("ERROR", _status(410, "Expired", f"too old resource version: {rv} "
                                                 f"({s._oldest})"))]
                else:
                    pending = []
        try:
            while True:
                for kind, obj in pending:
                    self._chunk({"type": kind, "object": obj})
                    if kind == "ERROR":
                        raise _Done
                with s._lock:
                    while True:
                        if not s.running:
                            raise _Cut
                        new = [(r, k, t, o) for (r, k, t, o) in s._history if r > rv and k == key]
                        now = time.monotonic()
                        if new or now >= end or (bookmarks and now >= next_bookmark):
                            break
                        s._lock.wait(min(end, next_bookmark if bookmarks else end) - now)
                    if new:
                        rv = new[-1][0]
                        pending = [(t, copy.deepcopy(o)) for (_r, _k, t, o) in new]
                        continue
                    if time.monotonic() >= end:
                        raise _Done
                    rv = max(rv, s._rv)
                    bookmark_rv = str(rv)
                kind, api = _KIND[key[0]]
                self._chunk({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api,
                                                            "metadata": {"resourceVersion": bookmark_rv}}})
                next_bookmark = time.monotonic() + s.bookmark_interval_s
                pending = []
        except _Done:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except _Cut:
            self.close_connection = True


class _Done(Exception):
    pass


class _Cut(Exception):
    pass
