"""Settings parsing: units, addresses, precedence flags > env > file > defaults, one-line errors."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import TLSPROXY
from tlsproxy.config import (
    HostPort,
    Upstream,
    build_settings,
    parse_duration,
    parse_hostport,
    parse_size,
    parse_upstream,
)
from tlsproxy.errors import ConfigError


@pytest.mark.parametrize("raw,seconds", [("30", 30), ("30s", 30), ("5m", 300), ("14d", 14 * 86400),
                                         ("500ms", 0.5), ("1.5h", 5400), (7, 7)])
def test_durations(raw, seconds):
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["", "abc", "5x", "-1", "1 2", True])
def test_bad_durations(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize("raw,size", [("65536", 65536), ("64KiB", 65536), ("1MiB", 1 << 20), ("10MB", 10**7),
                                      ("2GiB", 2 << 30), (100, 100)])
def test_sizes(raw, size):
    assert parse_size(raw) == size


@pytest.mark.parametrize("raw", ["64XB", "KiB", "-5", "1.5MiB"])
def test_bad_sizes(raw):
    with pytest.raises(ValueError):
        parse_size(raw)


@pytest.mark.parametrize("raw,expected", [
    (":9443", HostPort("", 9443)), ("9443", HostPort("", 9443)),
    ("127.0.0.1:9443", HostPort("127.0.0.1", 9443)), ("[::1]:9443", HostPort("::1", 9443)),
    ("localhost:80", HostPort("localhost", 80)),
])
def test_hostports(raw, expected):
    assert parse_hostport(raw) == expected


@pytest.mark.parametrize("raw", ["::1:9443", "[::1]", "host:99999", "host:", "[nothost]:1", "nohostport"])
def test_bad_hostports(raw):
    with pytest.raises(ValueError):
        parse_hostport(raw)


def test_upstreams():
    assert parse_upstream("http://127.0.0.1:8080") == Upstream("http", "127.0.0.1", 8080)
    assert parse_upstream("http://[::1]:8080") == Upstream("http", "::1", 8080)
    assert parse_upstream("http://app") == Upstream("http", "app", 80)
    for bad in ("ftp://x:1", "http://x:1/path", "http://", "127.0.0.1:8080", "tcp://host"):
        with pytest.raises(ValueError):
            parse_upstream(bad)


def test_precedence_flags_env_file_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("idle-timeout: 7m\nhead_timeout: 3\nmax-body-bytes: 1MiB\naccess-log: off\n")
    s = build_settings({"config": str(f), "idle-timeout": "9"}, {"TLSPROXY_HEAD_TIMEOUT": "4s"})
    assert s.idle_timeout_s == 9          # flag beats file
    assert s.head_timeout_s == 4          # env beats file
    assert s.max_body_bytes == 1 << 20    # file beats default
    assert s.access_log is False
    assert s.body_timeout_s == 30         # default


def test_config_file_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("no-such-setting: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'no-such-setting'"):
        build_settings({"config": str(f)}, {})
    f.write_text("idle-timeout: [1, 2]\n")
    with pytest.raises(ConfigError, match="idle-timeout: expected a single value"):
        build_settings({"config": str(f)}, {})
    f.write_text("a: b: c:\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_settings({"config": str(f)}, {})
    with pytest.raises(ConfigError, match="cannot read"):
        build_settings({"config": str(tmp_path / "missing.yaml")}, {})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="--cert and --key go together"):
        build_settings({"cert": "/a"}, {})


@pytest.mark.parametrize("args,needle", [
    (["--head-timeout", "3x"], "--head-timeout: '3x' is not a duration"),
    (["--max-head-size", "big"], "--max-head-size: 'big' is not a size"),
    (["--listen", "::1:9443"], "--listen:"),
    (["--tls-min-version", "1.1"], "--tls-min-version: '1.1' is not allowed"),
    (["--access-log", "maybe"], "--access-log: 'maybe' is not on or off"),
    (["--upstream", "ftp://x:1"], "--upstream:"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_cli_bad_values_exit_2_with_one_line(args, needle):
    p = subprocess.run([TLSPROXY, "serve", *args], capture_output=True, text=True, timeout=20)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsproxy: error:"), p.stderr
    assert needle in lines[0]


def test_cli_env_bad_value_names_variable():
    p = subprocess.run([TLSPROXY, "serve"], capture_output=True, text=True, timeout=20,
                       env={"TLSPROXY_IDLE_TIMEOUT": "soon", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2
    assert "TLSPROXY_IDLE_TIMEOUT: 'soon' is not a duration" in p.stderr


def test_cli_missing_certificate_exits_2(tmp_path):
    p = subprocess.run([TLSPROXY, "serve", "--cert-dir", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=20)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("tlsproxy: error:")
    assert "Traceback" not in p.stderr
