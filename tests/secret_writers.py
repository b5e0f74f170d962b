"""The ways a Secret directory gets new files in real life, reproduced on disk for tests and bench.

* :func:`atomic_write` — kubelet's ``AtomicWriter`` (pkg/volume/util/atomic_writer.go), also used by
  cert-manager's CSI driver: payload into a new ``..<UTC timestamp>.<random>`` directory (mode 0755),
  user-visible ``name -> ..data/name`` symlinks created if missing, a ``..data_tmp`` symlink to the new
  directory renamed over ``..data`` (the atomic step), user-visible links of removed keys deleted, and
  finally the previous timestamped directory removed.
* :func:`copy_files` — ``cp new/tls.crt new/tls.key DIR/``: each file truncated and rewritten in place,
  one after the other (a reader may see a new certificate with the old key in between).
* :func:`move_files` — ``mv``: each file written next to the target then renamed over it, one by one.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"
DATA_TMP = "..data_tmp"


def _timestamp_dir_name(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    # Go's os.MkdirTemp(dir, "..2006_01_02_15_04_05.") appends a random decimal string.
    return now.strftime("..%Y_%m_%d_%H_%M_%S.") + str(random.randrange(10**8, 10**9))


def atomic_write(target: Path, payload: Mapping[str, bytes], mode: int = 0o644) -> bool:
    """Project ``payload`` (file name → bytes) into ``target`` exactly as kubelet does.

    Returns False when nothing changed (kubelet then writes nothing at all).
    """
    target.mkdir(parents=True, exist_ok=True)
    data = target / DATA
    try:
        old_ts = os.readlink(data)
    except FileNotFoundError:
        old_ts = ""
    old_paths: set[str] = set()
    if old_ts:
        old_dir = target / old_ts
        old_paths = {p.name for p in old_dir.iterdir()} if old_dir.is_dir() else set()
        same = all((old_dir / name).is_file() and (old_dir / name).read_bytes() == content
                   for name, content in payload.items())
        if same and not (old_paths - set(payload)):
            return False
    # (5) new timestamped directory, 0755 regardless of umask
    ts_name = _timestamp_dir_name()
    ts_dir = target / ts_name
    ts_dir.mkdir()
    os.chmod(ts_dir, 0o755)
    # (6) payload into it
    for name, content in payload.items():
        path = ts_dir / name
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
    # (7) user-visible symlinks for new names (kubelet leaves any existing entry alone)
    for name in payload:
        visible = target / name
        if not os.path.lexists(visible):
            os.symlink(os.path.join(DATA, name), visible)
    # (8) ..data_tmp -> new dir, (9) renamed over ..data: the atomic switch
    os.symlink(ts_name, target / DATA_TMP)
    os.rename(target / DATA_TMP, data)
    # (10) user-visible links of keys no longer in the payload
    for name in old_paths - set(payload):
        try:
            os.remove(target / name)
        except FileNotFoundError:
            pass
    # (11) the old timestamped directory
    if old_ts:
        shutil.rmtree(target / old_ts, ignore_errors=True)
    return True


def copy_files(target: Path, payload: Mapping[str, bytes]) -> None:
    """``cp`` semantics: open with O_TRUNC and write, file after file (not atomic)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, content in payload.items():
        with open(target / name, "wb") as f:
            f.write(content)


def move_files(target: Path, payload: Mapping[str, bytes], staging: Path | None = None) -> None:
    """``mv`` semantics: each file written in a staging directory on the same filesystem, then
    renamed over the target (each file atomic, the pair not)."""
    target.mkdir(parents=True, exist_ok=True)
    staging = staging or target.parent / (target.name + ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    for name, content in payload.items():
        (staging / name).write_bytes(content)
    for name in payload:
        os.rename(staging / name, target / name)


def pair_payload(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None = None,
                 extra: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
    out = {"tls.crt": cert_pem, "tls.key": key_pem}
    if ca_pem is not None:
        out["ca.crt"] = ca_pem
    out.update(extra or {})
    return out
