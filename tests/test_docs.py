"""Docs are part of the feature: every flag is documented, and the README leads with two commands."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_flags", ROOT / "docs" / "gen_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_doc_is_up_to_date():
    assert (ROOT / "docs" / "flags.md").read_text() == _gen().render(), \
        "docs/flags.md is stale: run .venv/bin/python docs/gen_flags.py"


def test_readme_leads_with_run_and_test_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci


def test_every_metric_family_is_documented():
    from tlsproxy.metrics import Metrics

    ops = (ROOT / "docs" / "operations.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    missing = sorted(n for n in names if n not in ops)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"
