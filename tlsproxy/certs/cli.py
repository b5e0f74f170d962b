"""``tlsproxy certs bootstrap|check|inspect`` and ``tlsproxy trust``: make, dry-run-reload and
describe certificates; trust the development CA.

Exit codes: 0 success; 1 ``check`` found material a reload would refuse; 2 bad usage or unusable
input (one line ``tlsproxy: error: ...`` on stderr, never a traceback).

The argument definitions here are cheap; the implementations (``bootstrap``, ``inspect``, ``bundle``,
``trust``: cryptography and YAML) are imported by the run functions, only for these commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..args import EXIT_USAGE
from ..errors import CertError, ConfigError

EXIT_OK = 0
EXIT_REFUSED = 1
# Shown in --help without importing bootstrap; tests/certs/test_cli_structure.py holds them equal.
DEFAULT_DAYS = 365
MAX_DAYS = 3650


def _bootstrap_check(name: str) -> Callable[[str], object]:
    """An argparse type that runs ``bootstrap.<name>`` (imported when a value is parsed)."""
    def parse(text: str) -> object:
        from . import bootstrap as bs

        try:
            return getattr(bs, name)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = {"k8s_label": "name", "dns_name": "DNS name", "ip_address": "IP address",
                      "uri_san": "URI"}.get(name, name)
    return parse


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{days} is out of range (1..{MAX_DAYS})")
    return days


_days.__name__ = "days"


# ---------------------------------------------------------------------------- arguments

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_action", metavar="ACTION", parser_class=type(parser))

    b = sub.add_parser("bootstrap", help="make a CA and a server (and client) certificate for a Service",
                       description="Make a CA and a server certificate for a Kubernetes Service (and a "
                       "client certificate for mutual TLS), as kubernetes.io/tls Secret files or manifests.")
    b.add_argument("--service", required=True, type=_bootstrap_check("k8s_label"), metavar="NAME",
                   help="Service name (SANs NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local)")
    b.add_argument("--namespace", required=True, type=_bootstrap_check("k8s_label"), metavar="NS",
                   help="the Service's namespace")
    b.add_argument("--out", type=Path, metavar="DIR",
                   help="directory to write ca.crt, ca.key, tls.crt, tls.key (and client/) into; created "
                   "if missing (required unless --format secret-yaml)")
    b.add_argument("--dns", action="append", default=[], type=_bootstrap_check("dns_name"),
                   metavar="NAME", help="extra DNS SAN (repeatable)")
    b.add_argument("--ip", action="append", default=[], type=_bootstrap_check("ip_address"),
                   metavar="ADDR", help="extra IP SAN (repeatable)")
    b.add_argument("--key-type", choices=("ecdsa", "rsa"), default="ecdsa",
                   help="ECDSA P-256 or RSA 2048 (for a new CA too) [default: ecdsa]")
    b.add_argument("--days", type=_days, default=DEFAULT_DAYS, metavar="N",
                   help=f"validity of the issued certificates [default: {DEFAULT_DAYS}]")
    b.add_argument("--ca-dir", type=Path, metavar="DIR",
                   help="reuse the CA in DIR (ca.crt + ca.key) instead of making a new one")
    b.add_argument("--client", type=_bootstrap_check("k8s_label"), metavar="NAME",
                   help="also issue a client certificate (CN=NAME, clientAuth) into OUT/client/")
    b.add_argument("--client-uri", action="append", default=[], type=_bootstrap_check("uri_san"),
                   metavar="URI", help="URI SAN of the client certificate, e.g. a SPIFFE ID (repeatable)")
    b.add_argument("--format", choices=("files", "secret-yaml", "cabundle"), default="files",
                   help="files: write files, print a summary; secret-yaml: print kubernetes.io/tls Secret "
                   "manifests; cabundle: print the base64 CA [default: files]")
    b.add_argument("--force", action="store_true", help="replace existing files in --out")

    c = sub.add_parser("check", help="dry-run a reload: would this certificate be served?",
                       description="Validate a Secret directory (or --cert/--key) exactly as a reload "
                       "would. Exit 0: would be served; 1: would be refused; 2: bad usage.")
    c.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="kubernetes.io/tls Secret directory")
    c.add_argument("--cert", type=Path, metavar="FILE", help="certificate chain PEM (with --key)")
    c.add_argument("--key", type=Path, metavar="FILE", help="private key PEM (with --cert)")
    c.add_argument("--ca", type=Path, metavar="FILE", help="CA bundle PEM (with --cert/--key)")
    c.add_argument("--require-client-cert", action="store_true",
                   help="also load the directory's ca.crt (or --ca) as the client CA, as serve would")
    c.add_argument("--client-ca", type=Path, metavar="FILE",
                   help="also load FILE as the client CA, as serve --client-ca would")
    c.add_argument("--json", action="store_true", help="print JSON")

    i = sub.add_parser("inspect", help="show subject, SANs, issuer, validity and key match",
                       description="Describe a PEM certificate file or a Secret directory.")
    i.add_argument("path", type=Path, metavar="PATH", help="a PEM file or a Secret directory")
    i.add_argument("--json", action="store_true", help="print JSON")


# ---------------------------------------------------------------------------- bootstrap

def _run_bootstrap(ns: argparse.Namespace) -> int:
    from . import bootstrap as bs

    if ns.out is None and ns.format != "secret-yaml":
        raise ConfigError(f"--out DIR is required with --format {ns.format}")
    if ns.client_uri and not ns.client:
        raise ConfigError("--client-uri needs --client NAME")
    spec = bs.Spec(service=ns.service, namespace=ns.namespace, dns=tuple(ns.dns), ips=tuple(ns.ip),
                   key_type=ns.key_type, days=ns.days, client=ns.client, client_uris=tuple(ns.client_uri))
    ca = bs.load_ca(ns.ca_dir) if ns.ca_dir is not None else None
    material = bs.issue_material(spec, ca)
    written = []
    if ns.out is not None:
        if ns.out.exists() and not ns.out.is_dir():
            raise ConfigError(f"--out {ns.out}: exists and is not a directory")
        written = bs.write_files(ns.out, bs.files_of(material), force=ns.force)
    if ns.format == "secret-yaml":
        sys.stdout.write(bs.render_yaml(bs.secret_manifests(spec, material)))
    elif ns.format == "cabundle":
        sys.stdout.write(bs.cabundle(material) + "\n")
    else:
        sys.stdout.write(_bootstrap_summary(spec, material, ns.out, written))
    return EXIT_OK


def _bootstrap_summary(spec, material, out: Path, written: list[Path]) -> str:
    from . import bootstrap as bs
    from . import inspect as insp

    server = insp.CertInfo.of(material.server.cert)
    lines = [f"wrote {len(written)} files to {out}: "
             + ", ".join(str(p.relative_to(out)) for p in written),
             f"CA:     {insp.CertInfo.of(material.ca.cert).subject}"
             + (" (new)" if material.ca_is_new else " (reused; its key stays where it is)"),
             f"server: {server.subject}; SANs {', '.join(server.dns_names + server.ip_addresses)}; "
             f"not after {server.not_after.isoformat()}"]
    if material.client is not None:
        client = insp.CertInfo.of(material.client.cert)
        lines.append(f"client: {client.subject} in {out / bs.CLIENT_SUBDIR}; "
                     f"not after {client.not_after.isoformat()}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- check

def _run_check(ns: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from . import inspect as insp
    from .bundle import load_files, parse_pem_certs, read_file
    from .source import CertSource

    if ns.dir is not None and (ns.cert or ns.key or ns.ca):
        raise ConfigError("give DIR or --cert/--key, not both")
    if ns.dir is None and (ns.cert is None or ns.key is None):
        raise ConfigError("give a Secret directory DIR, or --cert FILE and --key FILE")
    if ns.dir is not None and not ns.dir.is_dir():
        raise ConfigError(f"{ns.dir}: no such directory")
    now = dt.datetime.now(dt.UTC)
    try:
        # The same loaders the watcher uses; then the same context build a reload does, because
        # OpenSSL can refuse what cryptography accepted. (Imported here: the CLI shell is the one
        # place in certs/ allowed to reach up into tls/.)
        from ..tls.contexts import ServerTLSOptions, server_context

        if ns.dir is not None:   # exactly what a reload reads, including a tls2.* pair
            bundles = CertSource(cert_dir=ns.dir).load_all(now)
        else:
            bundles = (load_files(ns.cert, ns.key, ns.ca, now=now),)
        bundle = bundles[0]
        client_ca = None
        if ns.client_ca is not None:
            client_ca = read_file(ns.client_ca, "client CA bundle")
            parse_pem_certs(client_ca, str(ns.client_ca), "client CA bundle")
        elif ns.require_client_cert:
            if bundle.ca_pem is None:
                raise CertError(ns.dir or ns.cert, "--require-client-cert needs a ca.crt (or --ca)")
            client_ca = bundle.ca_pem
        server_context(list(bundles), ServerTLSOptions(client_ca_pem=client_ca))
    except CertError as exc:
        if ns.json:
            sys.stdout.write(json.dumps({"ok": False, "path": exc.path, "reason": exc.reason}) + "\n")
        else:
            sys.stdout.write(f"refused: {exc.path}: {exc.reason}\n"
                             "  a reload would keep serving the previous certificate\n")
        return EXIT_REFUSED
    report = insp.check_report(bundle, now)
    if ns.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(insp.render_check(report))
    return EXIT_OK


# ---------------------------------------------------------------------------- inspect

def _run_inspect(ns: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from . import inspect as insp

    now = dt.datetime.now(dt.UTC)
    report = insp.inspect_path(ns.path).as_dict(now)
    if ns.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(insp.render_inspection(report))
    return EXIT_OK


_ACTIONS = {"bootstrap": _run_bootstrap, "check": _run_check, "inspect": _run_inspect}


def run(ns: argparse.Namespace) -> int:
    action = getattr(ns, "certs_action", None)
    if action is None:
        sys.stderr.write("tlsproxy: error: certs needs an action: bootstrap, check or inspect\n")
        return EXIT_USAGE
    return _ACTIONS[action](ns)


# ---------------------------------------------------------------------------- trust

TRUST_SETTINGS = ("state-dir", "dev-ca-name", "config")


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    from ..args import add_settings_arguments

    parser.add_argument("--uninstall", action="store_true",
                        help="remove every copy of the development CA (current or older) instead")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="show what would be done; change nothing")
    parser.add_argument("--system", choices=("auto", "debian", "redhat", "macos", "none"), default=None,
                        help="which system store to use; none skips it [default: auto, detected; "
                        "env TLSPROXY_TRUST_SYSTEM]")
    parser.add_argument("--system-root", type=Path, default=None, metavar="DIR",
                        help="put every system-store path under DIR instead of / (a sandbox) "
                        "[env TLSPROXY_TRUST_ROOT]")
    parser.add_argument("--no-nss", action="store_true",
                        help="leave the NSS databases (Chromium, Firefox) alone")
    add_settings_arguments(parser, flags=TRUST_SETTINGS)


def run_trust(ns: argparse.Namespace) -> int:
    import os

    from ..args import settings_from_args
    from . import devca
    from . import trust as tr

    settings = settings_from_args(ns)
    state = settings.state_dir or devca.default_state_dir()
    system = ns.system or os.environ.get("TLSPROXY_TRUST_SYSTEM") or "auto"
    if system not in tr.SYSTEMS:
        raise ConfigError(f"TLSPROXY_TRUST_SYSTEM: {system!r} is not one of {', '.join(tr.SYSTEMS)}")
    root = ns.system_root or Path(os.environ.get("TLSPROXY_TRUST_ROOT") or "/")
    if not root.is_dir():
        raise ConfigError(f"--system-root {root}: no such directory")
    opts = tr.Options(ca_file=state / "ca.crt", root=root, system=system, nss=not ns.no_nss)
    if ns.print_only:
        return _print_trust(opts, state, settings.dev_ca_names, ns.uninstall)
    pem = None
    if not ns.uninstall:
        try:
            made = devca.ensure_ca(state, settings.dev_ca_names)
        except OSError as exc:
            raise ConfigError(f"--state-dir: cannot create the development CA in {state}: "
                              f"{exc.strerror or exc}") from None
        pem = made.ca_file.read_bytes()
        names = devca.permitted_names(settings.dev_ca_names)
        sys.stdout.write(f"development CA: {made.ca_file} ({'new; ' if made.created else ''}"
                         f"permitted: {', '.join(names)})\n")
    tr.carry_out(tr.plan(opts, pem))
    return EXIT_OK


def _print_trust(opts, state: Path, names: tuple[str, ...], uninstall: bool) -> int:
    """``--print``: the steps, and nothing done (not even making the CA)."""
    from . import devca
    from . import trust as tr

    pem = None
    if not uninstall:
        problem = devca.check_ca(state, names)
        permitted = ", ".join(devca.permitted_names(names))
        if problem is None:
            pem = opts.ca_file.read_bytes()
            sys.stdout.write(f"development CA: {opts.ca_file} (permitted: {permitted})\n")
        else:
            pem = tr.NEW_CA
            why = "" if problem == "missing" else f", replacing the one there: {problem}"
            sys.stdout.write(f"would: make the development CA {opts.ca_file} (permitted: {permitted}{why})\n")
    for step in tr.plan(opts, pem):
        sys.stdout.write(("would: " if step.run else "") + step.what + "\n")
    return EXIT_OK
