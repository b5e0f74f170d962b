"""Reading a certificate source: one consistent read, content digests, the optional second pair."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.secret_writers import atomic_write, copy_files, pair_payload
from tests.support import make_pki
from tlsproxy.certs.source import CertSource
from tlsproxy.errors import CertError


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


def _payload(pki, key_type="ecdsa", name="localhost"):
    leaf = pki.issue(name, dns=("localhost",), key_type=key_type)
    return leaf, pair_payload(leaf.cert_pem, leaf.key_pem, pki.ca.cert_pem)


def test_kubelet_layout_reads_one_version(pki, tmp_path: Path) -> None:
    d = tmp_path / "vol"
    leaf, payload = _payload(pki)
    atomic_write(d, payload)
    src = CertSource(cert_dir=d)
    material = src.read()
    (bundle,) = material.bundles()
    assert bundle.cert_pem == leaf.cert_pem
    assert bundle.cert_path == str(d / "tls.crt")       # the name the operator knows, not ..2026_…
    first = material.digest
    assert src.read().digest == first                     # same bytes, same digest
    os.utime(d / "..data" / "tls.crt", (1, 1))            # mtime plays no part
    assert src.read().digest == first
    _leaf2, payload2 = _payload(pki)
    atomic_write(d, payload2)
    assert src.read().digest != first


def test_half_written_copy_is_refused_with_the_file_named(pki, tmp_path: Path) -> None:
    d = tmp_path / "plain"
    _leaf, payload = _payload(pki)
    copy_files(d, payload)
    new, _ = _payload(pki)
    copy_files(d, {"tls.crt": new.cert_pem})              # cp of the certificate done, key not yet
    with pytest.raises(CertError) as err:
        CertSource(cert_dir=d).load_all()
    assert err.value.path == str(d / "tls.key")
    assert "does not match" in err.value.reason


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="does not exist"):
        CertSource(cert_dir=tmp_path / "nope").read()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CertError, match="certificate is missing"):
        CertSource(cert_dir=tmp_path / "empty").read()


def test_second_pair_in_directory(pki, tmp_path: Path) -> None:
    d = tmp_path / "both"
    ec, payload = _payload(pki, "ecdsa")
    rsa = pki.issue("localhost", dns=("localhost",), key_type="rsa")
    payload.update({"tls2.crt": rsa.cert_pem, "tls2.key": rsa.key_pem})
    atomic_write(d, payload)
    bundles = CertSource(cert_dir=d).load_all()
    assert [b.info.key_type for b in bundles] == ["ecdsa", "rsa"]
    assert bundles[1].cert_path == str(d / "tls2.crt")


def test_second_pair_half_present_is_an_error(pki, tmp_path: Path) -> None:
    d = tmp_path / "half"
    _ec, payload = _payload(pki)
    rsa = pki.issue("localhost", key_type="rsa")
    payload["tls2.crt"] = rsa.cert_pem
    copy_files(d, payload)
    with pytest.raises(CertError, match="second private key is missing"):
        CertSource(cert_dir=d).read()


def test_second_pair_must_be_the_other_key_type(pki, tmp_path: Path) -> None:
    d = tmp_path / "same"
    _ec, payload = _payload(pki, "ecdsa")
    ec2 = pki.issue("localhost", key_type="ecdsa")
    payload.update({"tls2.crt": ec2.cert_pem, "tls2.key": ec2.key_pem})
    copy_files(d, payload)
    with pytest.raises(CertError, match="same key type"):
        CertSource(cert_dir=d).load_all()


def test_second_pair_from_files(pki, tmp_path: Path) -> None:
    ec = pki.issue("localhost", key_type="ecdsa")
    rsa = pki.issue("localhost", key_type="rsa")
    files = {}
    for name, data in (("ec.crt", ec.cert_pem), ("ec.key", ec.key_pem), ("rsa.crt", rsa.cert_pem),
                       ("rsa.key", rsa.key_pem)):
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    src = CertSource(cert=files["rsa.crt"], key=files["rsa.key"], cert2=files["ec.crt"], key2=files["ec.key"])
    assert [b.info.key_type for b in src.load_all()] == ["rsa", "ecdsa"]
    assert set(src.watch_paths) == {tmp_path}
