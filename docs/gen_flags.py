"""Regenerate docs/flags.md from the settings table: `.venv/bin/python docs/gen_flags.py`.

The table in tlsproxy/config.py is the single source of truth for flags, TLSPROXY_* variables and
--config keys; tests/test_docs.py fails when this file is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tlsproxy.config import options  # noqa: E402

HEADER = """# Flags, environment variables and config keys

Generated from `tlsproxy/config.py` by `docs/gen_flags.py` — do not edit by hand.

Every setting of `tlsproxy serve` (and `demo`, `webhook`) can be given three ways; the first found wins:

1. a flag, `--head-timeout 5s`;
2. an environment variable, `TLSPROXY_HEAD_TIMEOUT=5s` (single-valued settings only);
3. a key of the YAML file named by `--config` — the flag name, with `-` or `_`:
   `head-timeout: 5s`; repeatable settings take a list.

Durations take bare seconds or a unit: `30`, `30s`, `500ms`, `5m`, `2h`, `14d`.
Sizes take bytes or a unit: `65536`, `64KiB`, `1MiB`, `10MB`.
A bad value stops tlsproxy with one line naming the key and the problem, and exit code 2, e.g.
`tlsproxy: error: --head-timeout: '3x' is not a duration (e.g. 30, 30s, 5m, 14d)`.
"""


FOOTER = """
## Commands with flags of their own

`tlsproxy demo` takes every setting above, plus `--app-port PORT` (the built-in app's port on
127.0.0.1; default any free port); its `--drain-delay` defaults to `0` (a person stops it with Ctrl-C),
unless given as a flag or `TLSPROXY_DRAIN_DELAY`.

`tlsproxy trust` installs the standalone development CA in the system store and the NSS databases
(Chromium, Firefox), or removes it (docs/certificates.md). It takes `--state-dir`, `--dev-ca-name` and
`--config` as above, and:

| flag | environment | default | meaning |
|---|---|---|---|
| `--print` | — | off | show what would be done; change nothing |
| `--uninstall` | — | off | remove every copy of the development CA (current or older) instead |
| `--system auto\\|debian\\|redhat\\|macos\\|none` | `TLSPROXY_TRUST_SYSTEM` | `auto` | \
which system store to use; `none` skips it |
| `--system-root DIR` | `TLSPROXY_TRUST_ROOT` | `/` | put every system-store path under DIR (a sandbox) |
| `--no-nss` | — | off | leave the NSS databases (Chromium, Firefox) alone |

`tlsproxy certs …`, `inject` and `webhook` flags: docs/certificates.md and docs/kubernetes.md.
"""


def _default(o) -> str:
    d = o.default
    if o.repeat:
        return ", ".join(f"`{x}`" for x in d) if d else "—"
    if d is None or d == "":
        return "—"
    if isinstance(d, bool):
        return "`on`" if d else "`off`"
    return f"`{d}`"


def render() -> str:
    out = [HEADER]
    groups: dict[str, list] = {}
    for o in options():
        groups.setdefault(o.group, []).append(o)
    for group, rows in groups.items():
        out.append(f"\n## {group}\n")
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        for o in rows:
            flag = f"`--{o.flag} {o.metavar or 'VALUE'}`" + (" (repeatable)" if o.repeat else "")
            env = "—" if o.repeat else f"`{o.env}`"
            meaning = o.help.replace("|", "\\|")
            out.append(f"| {flag} | {env} | {_default(o)} | {meaning} |")
    return "\n".join(out) + "\n" + FOOTER


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "flags.md"
    target.write_text(render())
    print(f"wrote {target}")
