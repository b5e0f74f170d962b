"""``tlsproxy inject`` (offline, like ``linkerd inject``) and ``tlsproxy webhook`` (the admission server).

Both take ``--image``; both go through :func:`tlsproxy.webhook.injector.decide`. The argument
definitions here are cheap; the injector, the YAML reader and the webhook server are imported by the
run functions, only for these commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..args import add_settings_arguments, settings_from_args
from ..errors import ConfigError


def _image_argument(parser: argparse.ArgumentParser) -> None:
    # The default is injector.default_image(), resolved in _options (the injector loads only for
    # these commands); tests/test_cli_structure.py holds this help text to it.
    parser.add_argument("--image", default=None, metavar="IMAGE",
                        help=f"image of the injected tlsproxy container [default: tlsproxy:{__version__}]")
    parser.add_argument("--image-pull-policy", default="IfNotPresent",
                        choices=("IfNotPresent", "Always", "Never"),
                        help="imagePullPolicy of the injected container [default: IfNotPresent]")


def _options(ns: argparse.Namespace):
    from .injector import InjectOptions, default_image

    image = (ns.image if ns.image is not None else default_image()).strip()
    if not image or any(ch.isspace() for ch in image):
        raise ConfigError(f"--image: {ns.image!r} is not an image reference")
    return InjectOptions(image=image, image_pull_policy=ns.image_pull_policy)


# ---------------------------------------------------------------------------- inject

def add_inject_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="multi-document YAML to rewrite, or - for standard input")
    _image_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-workload summary on stderr")


def run_inject(ns: argparse.Namespace) -> int:
    from .injector import Injected, Skipped
    from .k8s_yaml import inject_text

    options = _options(ns)
    if ns.filename == "-":
        text, source = sys.stdin.read(), "-"
    else:
        path = Path(ns.filename)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not a readable text file"
            raise ConfigError(f"-f {path}: {reason}") from None
        source = str(path)
    out, reports = inject_text(text, options, source=source)
    sys.stdout.write(out)
    if not ns.quiet:
        for r in reports:
            if isinstance(r.decision, Injected):
                sys.stderr.write(f"{r.what} injected\n")
            elif isinstance(r.decision, Skipped):
                sys.stderr.write(f"{r.what} skipped: {r.decision.reason}\n")
    return 0




# ---------------------------------------------------------------------------- webhook

# The serve settings that mean something to the webhook (no upstream, outbound, mTLS or plain HTTP).
WEBHOOK_FLAGS = (
    "listen", "admin", "cert-dir", "cert", "key", "reload-interval", "tls-min-version",
    "tls-session-tickets", "max-connections", "handshake-timeout", "head-timeout", "body-timeout",
    "idle-timeout", "drain-timeout", "drain-delay", "log-format", "log-level", "config",
    # its own certificate in a Secret, through the Kubernetes API (docs/kubernetes.md)
    "provision-secret", "provision-service", "provision-dns", "provision-cert-validity",
    "provision-ca-validity", "provision-rollover-delay", "kubeconfig",
)

def _object_name(raw: str) -> str:
    from ..config import parse_object_ref

    try:
        ref = parse_object_ref(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if ref.namespace is not None:
        raise argparse.ArgumentTypeError(f"{raw!r}: a MutatingWebhookConfiguration has no namespace")
    return ref.name


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, flags=WEBHOOK_FLAGS)
    _image_argument(parser)
    parser.add_argument("--webhook-configuration", metavar="NAME", default=None, type=_object_name,
                        help="keep the caBundle of this MutatingWebhookConfiguration equal to the ca.crt "
                        "of --provision-secret (on start, on rotation, and after any edit)")


def run_webhook(ns: argparse.Namespace) -> int:
    from .. import log as logging_setup
    from ..errors import CertError
    from ..runtime import run_main
    from .server import Webhook, WebhookConfig

    settings = settings_from_args(ns)
    logging_setup.setup(settings.log_format, settings.log_level)
    webhook = Webhook(WebhookConfig(settings, _options(ns), webhook_configuration=ns.webhook_configuration))
    if settings.provision_secret is None:      # a provisioned certificate comes later, from the API
        try:
            webhook.load_certificates()
        except CertError as exc:
            raise ConfigError(str(exc)) from None
    return run_main(webhook.run_with_signals)


