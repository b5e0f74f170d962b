"""nginx configuration templates for the benchmark (pure: values in, config text out).

Three roles, each its own nginx instance so each can be pinned to its own CPU:

* ``upstream_conf``: the app behind both proxies (plain HTTP: a small body, 1 MiB and 64 MiB
  files) plus a TLS listener used as the *peer* of the outbound row;
* ``proxy_conf``: nginx as the TLS 1.3-only terminating proxy that tlsproxy is compared with; one
  port with resumption off (no tickets, no session cache), one with tickets on, and one speaking
  HTTP/2 to clients (row (h));
* ``outbound_conf``: nginx originating TLS (``proxy_pass https://``) to the peer.

Like-for-like choices (see docs/performance.md): access logs off, keep-alive to the upstream
(``keepalive`` pool, HTTP/1.1), a generous ``keepalive_requests``, ``worker_rlimit_nofile`` high
enough for the idle-connection row.
"""

from __future__ import annotations

from pathlib import Path

SMALL_BODY = b"hello, world\n"
FILES = {"small": len(SMALL_BODY), "1m": 1 << 20, "64m": 64 << 20}


def _main(work: Path, name: str, workers: int) -> str:
    return f"""
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
events {{ worker_connections 10000; multi_accept off; }}
"""


def _http_common(work: Path, name: str) -> str:
    return f"""
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {work}/{name}.body;
    proxy_temp_path {work}/{name}.proxy;
    fastcgi_temp_path {work}/{name}.fastcgi;
    uwsgi_temp_path {work}/{name}.uwsgi;
    scgi_temp_path {work}/{name}.scgi;
    types {{ text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
"""


def upstream_conf(work: Path, port: int, tls_port: int, cert: Path, key: Path) -> str:
    return _main(work, "upstream", 1) + f"""
http {{
{_http_common(work, "upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {work}/www;
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        root {work}/www;
    }}
}}
"""


def _tls_server(port: int, cert: Path, key: Path, upstream: str, *, resumption: bool,
                access_log: str, reuseport: bool, http2: bool = False) -> str:
    tickets = "on" if resumption else "off"
    cache = "shared:bench:10m" if resumption else "off"
    h2 = " http2" if http2 else ""        # nginx 1.22: `listen … ssl http2` (1.25+: `http2 on;`)
    return f"""
    server {{
        listen 127.0.0.1:{port} ssl{h2} backlog=4096{" reuseport" if reuseport else ""};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_session_tickets {tickets};
        ssl_session_cache {cache};
        {access_log}
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_buffering on;
        }}
    }}
"""


def proxy_conf(work: Path, *, port: int, resume_port: int, upstream_port: int, cert: Path, key: Path,
               workers: int = 1, name: str = "proxy", h2_port: int | None = None) -> str:
    """nginx as the terminating proxy: ``port`` has resumption off, ``resume_port`` on. With more
    than one worker, ``port`` listens with ``reuseport`` (one socket per worker), as ``--workers`` does.
    ``h2_port``: a third server, resumption off, that speaks HTTP/2 (ALPN h2) to clients; the
    upstream leg stays HTTP/1.1 keep-alive, as tlsproxy's ``http://`` upstream."""
    up = f"bench_app_{name}"
    return _main(work, name, workers) + f"""
http {{
{_http_common(work, name)}
    upstream {up} {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
{_tls_server(port, cert, key, up, resumption=False, access_log="access_log off;", reuseport=workers > 1)}
{_tls_server(resume_port, cert, key, up, resumption=True, access_log="access_log off;", reuseport=False)}
{_tls_server(h2_port, cert, key, up, resumption=False, access_log="access_log off;", reuseport=False,
             http2=True) if h2_port else ""}
}}
"""


def outbound_conf(work: Path, *, port: int, peer_port: int, ca: Path) -> str:
    """nginx originating TLS 1.3 to the peer, verified against ``ca``, with a keep-alive pool."""
    return _main(work, "outbound", 1) + f"""
http {{
{_http_common(work, "outbound")}
    upstream bench_peer {{
        server 127.0.0.1:{peer_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass https://bench_peer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""


def write_site(work: Path) -> None:
    """The upstream's files: a small body, 1 MiB and 64 MiB (written once, zeros)."""
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "small").write_bytes(SMALL_BODY)
    block = b"\0" * (1 << 20)
    for name, size in (("1m", 1 << 20), ("64m", 64 << 20)):
        with (www / name).open("wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
    work.chmod(0o755)
    www.chmod(0o755)
