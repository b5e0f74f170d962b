"""The reloader: build-validate-swap with real files, real contexts and a real store (no sockets)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.secret_writers import atomic_write, copy_files, pair_payload
from tests.support import make_pki
from tlsproxy.certs.source import CertSource, Material
from tlsproxy.errors import CertError
from tlsproxy.metrics import Metrics
from tlsproxy.tls.contexts import server_context
from tlsproxy.tls.reload import Reloader
from tlsproxy.tls.store import ContextStore


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


def _build(material: Material):
    bundles = material.bundles()
    return server_context(bundles), bundles


def _reloader(directory: Path) -> tuple[Reloader, ContextStore, Metrics]:
    store, metrics = ContextStore(), Metrics()
    src = CertSource(cert_dir=directory)
    return Reloader(store, src.read, _build, metrics, describe=str(directory)), store, metrics


def _count(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("tlsproxy_certificate_reloads_total",
                                             {"role": "server", "result": result}) or 0.0


def _serial(store: ContextStore) -> str:
    gen = store.generation
    assert gen is not None
    return gen.bundles[0].info.serial


def _write(pki, d: Path, **kw) -> str:
    leaf = pki.issue("localhost", dns=("localhost",), **kw)
    atomic_write(d, pair_payload(leaf.cert_pem, leaf.key_pem, pki.ca.cert_pem))
    return format(leaf.cert.serial_number, "x")


async def test_change_swaps_unchanged_does_not_sighup_forces(pki, tmp_path: Path) -> None:
    d = tmp_path / "s"
    first = _write(pki, d)
    reloader, store, metrics = _reloader(d)
    gen1 = reloader.load_now()
    assert _serial(store) == first
    assert (await reloader.reload("files")).result == "unchanged"
    assert store.generation is gen1
    second = _write(pki, d)
    outcome = await reloader.reload("files")
    assert outcome.result == "swapped"
    assert _serial(store) == second and store.generation.number == 2
    assert store.current is not gen1.context             # a new context, the old one untouched
    assert (await reloader.reload("sighup", force=True)).result == "swapped"
    assert store.generation.number == 3
    assert _count(metrics, "success") == 3


@pytest.mark.parametrize("breakage, file, reason", [
    ("garbage_cert", "tls.crt", "not PEM"),
    ("empty_key", "tls.key", "private key is empty"),
    ("mismatched_key", "tls.key", "does not match"),
    ("expired", "tls.crt", "expired"),
    ("missing_key", "tls.key", "private key is missing"),
])
async def test_bad_material_never_replaces_good(pki, tmp_path: Path, breakage, file, reason) -> None:
    d = tmp_path / "s"
    good = _write(pki, d)
    reloader, store, metrics = _reloader(d)
    reloader.load_now()
    live = store.generation
    other = pki.issue("localhost")
    if breakage == "garbage_cert":
        atomic_write(d, {"tls.crt": b"this is not a certificate\n", "tls.key": other.key_pem})
    elif breakage == "empty_key":
        atomic_write(d, {"tls.crt": other.cert_pem, "tls.key": b""})
    elif breakage == "mismatched_key":
        atomic_write(d, {"tls.crt": other.cert_pem, "tls.key": pki.issue("x").key_pem})
    elif breakage == "expired":
        now = dt.datetime.now(dt.UTC)
        _write(pki, d, not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1))
    elif breakage == "missing_key":
        atomic_write(d, {"tls.crt": other.cert_pem})
    outcome = await reloader.reload("files")
    assert outcome.result == "failed"
    assert store.generation is live and _serial(store) == good      # still serving the old one
    assert outcome.error is not None and outcome.error.path == str(d / file)
    assert reason in outcome.error.reason
    assert store.last_error and str(d / file) in store.last_error and store.last_reload_ok is False
    assert _count(metrics, "failure") == 1
    # the same bad material again (periodic re-check, a touch): not re-reported, not retried
    assert (await reloader.reload("periodic")).result == "refused_again"
    assert _count(metrics, "failure") == 1
    # fixed on the next change
    fixed = _write(pki, d)
    assert (await reloader.reload("files")).result == "swapped"
    assert _serial(store) == fixed and store.last_error is None and store.last_reload_ok


async def test_half_written_copy_then_completed(pki, tmp_path: Path) -> None:
    d = tmp_path / "plain"
    leaf = pki.issue("localhost")
    copy_files(d, pair_payload(leaf.cert_pem, leaf.key_pem))
    reloader, store, _ = _reloader(d)
    reloader.load_now()
    new = pki.issue("localhost")
    copy_files(d, {"tls.crt": new.cert_pem})                 # first cp
    assert (await reloader.reload("files")).result == "failed"
    assert _serial(store) == format(leaf.cert.serial_number, "x")
    copy_files(d, {"tls.key": new.key_pem})                  # second cp
    assert (await reloader.reload("files")).result == "swapped"
    assert _serial(store) == format(new.cert.serial_number, "x")


async def test_startup_failure_raises_and_is_recorded(tmp_path: Path) -> None:
    reloader, store, metrics = _reloader(tmp_path / "absent")
    with pytest.raises(CertError, match="does not exist"):
        reloader.load_now()
    assert not store.ready and "does not exist" in (store.last_error or "")
    # a missing directory polled again is not re-reported
    assert (await reloader.reload("poll")).result == "refused_again"
    assert _count(metrics, "failure") == 1


async def test_an_unexpected_build_error_is_a_refusal_not_a_crash(pki, tmp_path: Path) -> None:
    d = tmp_path / "s"
    _write(pki, d)
    store, metrics = ContextStore(), Metrics()
    src = CertSource(cert_dir=d)
    broken = {"on": False}

    def build(material: Material):
        if broken["on"]:
            raise RuntimeError("boom")
        return _build(material)

    reloader = Reloader(store, src.read, build, metrics, describe=str(d))
    live = reloader.load_now()
    broken["on"] = True
    _write(pki, d)
    outcome = await reloader.reload("files")
    assert outcome.result == "failed" and "unexpected error" in outcome.error.reason
    assert store.generation is live
    assert (await reloader.reload("periodic")).result == "refused_again"   # same bytes: not retried
    broken["on"] = False
    assert (await reloader.reload("sighup", force=True)).result == "swapped"
