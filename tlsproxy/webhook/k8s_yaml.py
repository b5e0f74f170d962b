"""Offline injection into multi-document YAML (``tlsproxy inject``), through :func:`injector.decide`.

Pure text in, text out. Each document is located between ``---`` lines; a document that is not a
workload, or that the policy skips, is written back byte for byte (comments and formatting kept).
An injected document is re-serialised from the patched object. The pod template of a workload is
handed to the same policy as a Pod the webhook sees, and the same JSON Patch is applied to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError
from .injector import DEFAULT_OPTIONS, Decision, Denied, Injected, InjectOptions, apply_patch, decide

# kind -> path to the pod template ("" = the document is the pod)
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Report:
    """One workload document: ``kind/name`` and what happened to it."""

    what: str
    decision: Decision


def split_documents(text: str) -> list[tuple[str, str]]:
    """``(separator line or "", body)`` pairs; joining them gives back ``text`` exactly."""
    out: list[tuple[str, str]] = []
    pos, sep = 0, ""
    for m in _SEPARATOR.finditer(text):
        out.append((sep, text[pos:m.start()]))
        sep, pos = m.group(0), m.end()
    out.append((sep, text[pos:]))
    return out


def inject_text(text: str, options: InjectOptions = DEFAULT_OPTIONS, *,
                source: str = "-") -> tuple[str, list[Report]]:
    """Inject every workload in ``text``. Raises ConfigError (one line) on bad YAML or a denial."""
    pieces: list[str] = []
    reports: list[Report] = []
    for index, (sep, body) in enumerate(split_documents(text)):
        try:
            doc = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} of document {index + 1}" if mark else f" document {index + 1}"
            raise ConfigError(f"{source}: not valid YAML ({where.strip()})") from None
        new_body = body
        if isinstance(doc, dict) and doc.get("kind") in TEMPLATE_PATHS:
            injected, report = _inject_document(doc, options)
            reports.append(report)
            if isinstance(report.decision, Denied):
                raise ConfigError(f"{source}: {report.what}: {report.decision.reason}")
            if injected is not None:
                new_body = yaml.safe_dump(injected, sort_keys=False, default_flow_style=False)
                if sep:
                    new_body = "\n" + new_body   # the separator line keeps no newline of its own
        pieces.append(sep + new_body)
    return "".join(pieces), reports


def _inject_document(doc: Mapping[str, Any], options: InjectOptions) -> tuple[dict[str, Any] | None, Report]:
    kind = doc["kind"]
    what = f"{kind.lower()}/{(doc.get('metadata') or {}).get('name', '?')}"
    template: Any = doc
    for key in TEMPLATE_PATHS[kind]:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        return None, Report(what, Denied(f"{kind} has no pod template at {'.'.join(TEMPLATE_PATHS[kind])}"))
    decision = decide(template, namespace_default=True, options=options)
    if not isinstance(decision, Injected):
        return None, Report(what, decision)
    pointer = "".join("/" + key for key in TEMPLATE_PATHS[kind])
    ops = [{**op, "path": pointer + op["path"]} for op in decision.patch]
    return apply_patch(dict(doc), ops), Report(what, decision)
