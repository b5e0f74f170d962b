"""Figures → medians, tlsproxy/nginx ratios, the printed table and the docs/performance.md entry (pure).

Besides its value per second, a load figure carries the CPU-seconds the proxy's process tree spent
on the step and so its count (requests, connections, MiB) *per proxy CPU-second*. On the bench's
two CPUs the load generator and the upstream share one, so the rate ratio can flatter whichever
proxy is slower (the faster one may be held back by the load CPU, not by its own); the per
CPU-second ratio does not depend on which side saturates first."""

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
    # what the step counts per proxy CPU-second ("req", "conn", "MiB"); None: no CPU column
    per_cpu: str | None = None

    @property
    def units(self) -> str:
        return f"{self.unit}, {self.per_cpu}/CPU-s" if self.per_cpu else self.unit


def cpu_key(key: str) -> str:
    """The samples of a figure's proxy CPU-seconds per step."""
    return f"{key}.cpu_s"


def per_cpu_key(key: str) -> str:
    """The samples of a figure's count per proxy CPU-second."""
    return f"{key}.per_cpu"


def per_cpu_second(count: float, cpu_s: float) -> float | None:
    """``count`` (requests, connections, MiB) per CPU-second; None when no CPU time was seen
    (a step too short for the kernel's 10 ms clock tick says nothing)."""
    return count / cpu_s if cpu_s > 0 else None


def ratio(t: float | None, n: float | None) -> float | None:
    """tlsproxy ÷ nginx, or None when either is missing or nginx's is 0."""
    return t / n if t is not None and n else None


def _ratio_at_least(x: float) -> tuple[str, Callable[[float, float], bool]]:
    return f"≥ {x:g}", lambda t, n: n > 0 and t / n >= x


def _ratio_at_most(x: float) -> tuple[str, Callable[[float, float], bool]]:
    return f"≤ {x:g}×", lambda t, n: n > 0 and t / n <= x


FIGURES = [
    Figure("ka_rps", "(a) keep-alive small requests, wrk -c50", "req/s", floor=_ratio_at_least(0.2),
           per_cpu="req"),
    Figure("ka_p50", "(a) keep-alive small requests p50", "ms", False),
    Figure("ka_p99", "(a) keep-alive small requests p99", "ms", False),
    Figure("ka_rps_log", "(a') same, tlsproxy access log ON (nginx off)", "req/s", per_cpu="req"),
    Figure("hs", "(b) full TLS 1.3 handshakes (resumption off)", "conn/s", floor=_ratio_at_least(0.7),
           per_cpu="conn"),
    Figure("resumed", "(b') resumed TLS 1.3 connections", "conn/s", per_cpu="conn"),
    Figure("dl64", "(c) one 64 MiB download", "MiB/s", floor=_ratio_at_least(0.9), per_cpu="MiB"),
    Figure("ka1m", "(c) 1 MiB keep-alive responses, wrk -c8", "MiB/s", floor=_ratio_at_least(0.8),
           per_cpu="MiB"),
    Figure("idle_rss", "(d) RSS per idle handshaken connection", "KiB", False, floor=_ratio_at_most(2)),
    Figure("outbound", "(e) outbound origination, wrk -c50 (app → proxy → TLS peer)", "req/s",
           per_cpu="req"),
    Figure("w2_rps", "(f) 2 workers unpinned, keep-alive small requests", "req/s", per_cpu="req"),
    Figure("w2_gain", "(f) 2-worker / 1-worker gain", "×",
           floor=("≥ nginx's gain", lambda t, n: t >= n)),
    Figure("fixed_p99", "(g) p99 latency at a fixed 1,000 req/s, paced", "ms", False,
           floor=("≤ nginx + 2 ms", lambda t, n: t - n <= 2.0), per_cpu="req"),
    Figure("fixed_p50", "(g) p50 latency at a fixed 1,000 req/s, paced", "ms", False),
    Figure("burst_p99", "(g') p99 at 1,000 req/s as h2load sends it (bursts)", "ms", False, per_cpu="req"),
    Figure("h2_rps", "(h) HTTP/2 small requests, h2load -c10 -m10", "req/s", per_cpu="req"),
]


@dataclass
class Results:
    """Every sample of every figure, per server; a figure may instead carry a reason it is n/a."""

    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, server: str, value: float) -> None:
        self.samples.setdefault((key, server), []).append(value)

    def add_step(self, key: str, server: str, value: float, *, count: float, cpu_s: float) -> None:
        """One step's figure with the proxy's CPU-seconds for it and ``count`` (what the figure's
        ``per_cpu`` names) done in them."""
        self.add(key, server, value)
        self.add(cpu_key(key), server, cpu_s)
        per = per_cpu_second(count, cpu_s)
        if per is not None:
            self.add(per_cpu_key(key), server, per)

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
        floor = f.floor[0] if f.floor else ""
        if f.key in results.missing and t is None:     # nginx's side may still have been measured
            pn = results.median(per_cpu_key(f.key), "nginx") if f.per_cpu else None
            cn = results.median(cpu_key(f.key), "nginx") if f.per_cpu else None
            out.append([f.label, f.units, results.missing[f.key], _fmt(n) if n is not None else "", "", "",
                        _fmt(pn) if pn is not None else "", "", f"— / {_fmt(cn)}" if cn is not None else "",
                        floor, "", ""])
            continue
        holds = ""
        if f.floor is not None and t is not None and n is not None:
            holds = "yes" if f.floor[1](t, n) else "**no**"
        spread = f"{results.spread(f.key, 'tlsproxy')} / {results.spread(f.key, 'nginx')}"
        cpu = ["", "", "", ""]
        if f.per_cpu:
            pt, pn = (results.median(per_cpu_key(f.key), s) for s in ("tlsproxy", "nginx"))
            ct, cn = (results.median(cpu_key(f.key), s) for s in ("tlsproxy", "nginx"))
            cpu = [_fmt(pt), _fmt(pn), _fmt(ratio(pt, pn)), f"{_fmt(ct)} / {_fmt(cn)}"]
        out.append([f.label, f.units, _fmt(t), _fmt(n), _fmt(ratio(t, n)), *cpu, floor, holds,
                    spread if spread != "— / —" else ""])
    return out


HEADER = ["figure", "unit", "tlsproxy", "nginx", "tlsproxy/nginx", "tlsproxy per CPU-s", "nginx per CPU-s",
          "ratio per CPU-s", "proxy CPU-s (tlsproxy / nginx)", "floor", "holds",
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
