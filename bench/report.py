"""Figures → medians, tlsproxy/nginx ratios, the printed table and the docs/performance.md entry (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    # floor: (description, test on (tlsproxy, nginx)) or None for an informative row
    floor: tuple[str, Callable[[float, float], bool]] | None = None


def _ratio_at_least(x: float) -> tuple[str, Callable[[float, float], bool]]:
    return f"≥ {x:g}", lambda t, n: n > 0 and t / n >= x


def _ratio_at_most(x: float) -> tuple[str, Callable[[float, float], bool]]:
    return f"≤ {x:g}×", lambda t, n: n > 0 and t / n <= x


FIGURES = [
    Figure("ka_rps", "(a) keep-alive small requests, wrk -c50", "req/s", floor=_ratio_at_least(0.2)),
    Figure("ka_p50", "(a) keep-alive small requests p50", "ms", False),
    Figure("ka_p99", "(a) keep-alive small requests p99", "ms", False),
    Figure("ka_rps_log", "(a') same, tlsproxy access log ON (nginx off)", "req/s"),
    Figure("hs", "(b) full TLS 1.3 handshakes (resumption off)", "conn/s", floor=_ratio_at_least(0.7)),
    Figure("resumed", "(b') resumed TLS 1.3 connections", "conn/s"),
    Figure("dl64", "(c) one 64 MiB download", "MiB/s", floor=_ratio_at_least(0.9)),
    Figure("ka1m", "(c) 1 MiB keep-alive responses, wrk -c8", "MiB/s", floor=_ratio_at_least(0.8)),
    Figure("idle_rss", "(d) RSS per idle handshaken connection", "KiB", False, floor=_ratio_at_most(2)),
    Figure("outbound", "(e) outbound origination, wrk -c50 (app → proxy → TLS peer)", "req/s"),
    Figure("w2_rps", "(f) 2 workers unpinned, keep-alive small requests", "req/s"),
    Figure("w2_gain", "(f) 2-worker / 1-worker gain", "×",
           floor=("≥ nginx's gain", lambda t, n: t >= n)),
    Figure("fixed_p99", "(g) p99 latency at a fixed 1,000 req/s, paced", "ms", False,
           floor=("≤ nginx + 2 ms", lambda t, n: t - n <= 2.0)),
    Figure("fixed_p50", "(g) p50 latency at a fixed 1,000 req/s, paced", "ms", False),
    Figure("burst_p99", "(g') p99 at 1,000 req/s as h2load sends it (bursts)", "ms", False),
]


@dataclass
class Results:
    """Every sample of every figure, per server; a figure may instead carry a reason it is n/a."""

    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, server: str, value: float) -> None:
        self.samples.setdefault((key, server), []).append(value)

    def spread(self, key: str, server: str) -> str:
        """``min–max`` of the runs ("—" without samples, the value alone for one run)."""
        values = self.samples.get((key, server))
        if not values:
            return "—"
        lo, hi = min(values), max(values)
        return _fmt(lo) if lo == hi else f"{_fmt(lo)}–{_fmt(hi)}"

    def median(self, key: str, server: str) -> float | None:
        values = self.samples.get((key, server))
        return statistics.median(values) if values else None


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def rows(results: Results) -> list[list[str]]:
    out = []
    for f in FIGURES:
        t, n = results.median(f.key, "tlsproxy"), results.median(f.key, "nginx")
        if f.key in results.missing and t is None:
            out.append([f.label, f.unit, results.missing[f.key], "", "", f.floor[0] if f.floor else "", "",
                        ""])
            continue
        ratio = _fmt(t / n) if t is not None and n else "—"
        holds = ""
        if f.floor is not None and t is not None and n is not None:
            holds = "yes" if f.floor[1](t, n) else "**no**"
        spread = f"{results.spread(f.key, 'tlsproxy')} / {results.spread(f.key, 'nginx')}"
        out.append([f.label, f.unit, _fmt(t), _fmt(n), ratio, f.floor[0] if f.floor else "", holds,
                    spread if spread != "— / —" else ""])
    return out


HEADER = ["figure", "unit", "tlsproxy", "nginx", "tlsproxy/nginx", "floor", "holds",
          "range of runs (tlsproxy / nginx)"]


def markdown_table(results: Results) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows(results):
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def text_table(results: Results) -> str:
    table = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


def entry(results: Results, *, title: str, facts: list[str], notes: list[str]) -> str:
    """One run, as appended to docs/performance.md."""
    parts = [f"\n### {title}\n", *[f"- {f}" for f in facts], "", markdown_table(results), ""]
    if notes:
        parts += [*[f"- {n}" for n in notes], ""]
    return "\n".join(parts)
