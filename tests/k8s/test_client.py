"""k8s/config.py and k8s/client.py against the stand-in API server: real HTTPS, bearer tokens,
resourceVersion conflicts, watch with bookmarks and 410 Gone."""

from __future__ import annotations

import base64

import pytest
import trio
import yaml

from tlsproxy.config import ObjectRef
from tlsproxy.errors import ConfigError
from tlsproxy.k8s import config as kconfig
from tlsproxy.k8s.client import MUTATING_WEBHOOKS, SECRETS, APIError, Client
from tlsproxy.k8s.watch import Backoff, Follower
from tlsproxy.metrics import Metrics

REF = ObjectRef("demo", "web-tls")


def in_cluster(standin, tmp_path, token="test-token"):
    sa = tmp_path / "sa"
    sa.mkdir(exist_ok=True)
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_bytes(standin.ca.cert_pem)
    (sa / "namespace").write_text("demo\n")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(standin.port)}
    return kconfig.discover(None, env, sa), sa


async def test_in_cluster_config_rereads_a_rotated_token_after_401(standin, tmp_path):
    standin.put_secret("demo", "web-tls", {"ca.crt": b"x"})
    cfg, sa = in_cluster(standin, tmp_path)
    assert cfg.namespace == "demo" and cfg.source == "in-cluster"
    async with Client(cfg) as client:
        obj = await client.get(SECRETS, REF)
        assert base64.b64decode(obj["data"]["ca.crt"]) == b"x"
        standin.tokens = {"rotated"}          # the kubelet rotated the token: the old one is refused
        (sa / "token").write_text("rotated")
        assert (await client.get(SECRETS, REF))["metadata"]["name"] == "web-tls"


async def test_errors_are_named_counted_and_403_names_the_rule(standin, tmp_path):
    metrics = Metrics()
    cfg = kconfig.from_kubeconfig(standin.kubeconfig())
    async with Client(cfg, metrics) as client:
        with pytest.raises(APIError) as info:
            await client.get(SECRETS, REF)
        assert info.value.code == 404 and "does not exist" in str(info.value)
        obj = standin.put_secret("demo", "web-tls")
        standin.deny.add(("update", "secrets", "web-tls"))
        with pytest.raises(APIError) as info:
            await client.update(SECRETS, REF, obj)
        text = str(info.value)
        assert info.value.code == 403 and "update secrets/web-tls in namespace demo" in text
        assert 'resourceNames: ["web-tls"], verbs: ["update"]' in text and "Role rule" in text
        standin.deny.clear()
        await client.update(SECRETS, REF, obj)          # the resourceVersion read: accepted
        with pytest.raises(APIError) as info:
            await client.update(SECRETS, REF, obj)      # the same one again: stale now
        assert info.value.conflict
        standin.deny.add(("patch", MUTATING_WEBHOOKS.plural, "tlsproxy"))
        with pytest.raises(APIError) as info:
            await client.patch(MUTATING_WEBHOOKS, ObjectRef(None, "tlsproxy"), {})
        assert "ClusterRole rule" in str(info.value) and 'apiGroups: ["admissionregistration.k8s.io"]' \
            in str(info.value)
    samples = {(s.labels["verb"], s.labels["code"]): s.value
               for m in metrics.registry.collect() if m.name == "tlsproxy_k8s_api_errors"
               for s in m.samples if s.name.endswith("_total")}
    assert samples == {("get", "404"): 1, ("update", "403"): 1, ("update", "409"): 1, ("patch", "403"): 1}


async def test_unreachable_and_wrong_token_are_one_line_errors(standin, tmp_path):
    cfg = kconfig.from_kubeconfig(standin.kubeconfig(token="wrong"))
    async with Client(cfg, timeout_s=2) as client:
        with pytest.raises(APIError) as info:
            await client.get(SECRETS, REF)
        assert info.value.code == 401 and "refused the credentials" in str(info.value)
    standin.stop()
    async with Client(kconfig.from_kubeconfig(standin.kubeconfig()), timeout_s=2) as client:
        with pytest.raises(APIError) as info:
            await client.get(SECRETS, REF)
        assert info.value.code == "unreachable" and "cannot reach the API server" in str(info.value)


def test_kubeconfig_subset_and_its_errors(tmp_path, standin):
    path = standin.kubeconfig(namespace="team")
    cfg = kconfig.discover(None, {"KUBECONFIG": f"{path}:/nonexistent"})
    assert cfg.server == standin.url and cfg.namespace == "team" and cfg.bearer() == "test-token"
    doc = yaml.safe_load(path.read_text())
    doc["users"][0]["user"] = {"exec": {"command": "aws"}}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="uses exec, which tlsproxy does not support"):
        kconfig.from_kubeconfig(path)
    doc["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="insecure-skip-tls-verify is refused"):
        kconfig.from_kubeconfig(path)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST is not set"):
        kconfig.discover(None, {})
    with pytest.raises(ConfigError, match="no such file|No such file"):
        kconfig.discover(tmp_path / "missing", {})


async def test_follower_sees_changes_resumes_after_bookmarks_and_relists_after_410(standin):
    standin.bookmark_interval_s = 0.1
    standin.put_secret("demo", "web-tls", {"n": b"0"})
    seen: list[bytes] = []
    changed = [trio.Event()]

    async def on_object(obj):
        seen.append(base64.b64decode((obj or {}).get("data", {}).get("n", "")))
        changed[0].set()

    async def until_seen(value: bytes) -> None:
        while not seen or seen[-1] != value:
            changed[0] = trio.Event()
            await changed[0].wait()

    cfg = kconfig.from_kubeconfig(standin.kubeconfig())
    async with Client(cfg, watch_timeout_s=1) as client:     # the server ends each watch after 1 s
        follower = Follower(client, SECRETS, REF, on_object, backoff=Backoff(0.05, 0.2))
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            with trio.fail_after(5):
                await until_seen(b"0")
                await trio.sleep(1.5)                 # a watch ended and resumed, bookmarks came
                assert seen == [b"0"]                 # nothing replayed
                standin.put_secret("demo", "web-tls", {"n": b"1"})
                await until_seen(b"1")
                gets = len([r for r in standin.requests if r[0] == "GET" and "watch" not in r[1]])
                standin.expire_next_watch = True      # compacted while the watch reconnects: 410
                await trio.sleep(1.5)                 # the watch in progress ends (1 s) and resumes
                assert not standin.expire_next_watch
                standin.put_secret("demo", "web-tls", {"n": b"2"})
                await until_seen(b"2")
                assert len([r for r in standin.requests if r[0] == "GET" and "watch" not in r[1]]) > gets
                standin.stop()                        # away: the follower backs off and retries
                await trio.sleep(0.5)
                standin.start()
                standin.put_secret("demo", "web-tls", {"n": b"3"})
                await until_seen(b"3")
            nursery.cancel_scope.cancel()
    assert seen == sorted(seen) and seen[:2] == [b"0", b"1"]     # in order; a relist hands over the state
    watches = [r for r in standin.requests if "watch=1" in r[1]]
    assert any("allowWatchBookmarks=true" in r[1] and "resourceVersion=1" in r[1] for r in watches)


def test_bundle_patch_touches_only_stale_entries():
    from tlsproxy.k8s.cabundle import bundle_patch

    ca = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    want = base64.b64encode(ca).decode()
    obj = {"metadata": {"resourceVersion": "7"},
           "webhooks": [{"name": "a", "clientConfig": {"caBundle": want, "service": {"name": "s"}}},
                        {"name": "b", "clientConfig": {"service": {"name": "s"}}},
                        {"name": "c", "clientConfig": {"caBundle": "b2xk"}}]}
    assert bundle_patch(obj, ca) == {"metadata": {"resourceVersion": "7"}, "webhooks": [
        {"name": "b", "clientConfig": {"caBundle": want}}, {"name": "c", "clientConfig": {"caBundle": want}}]}
    obj["webhooks"] = obj["webhooks"][:1]
    assert bundle_patch(obj, ca) is None


async def test_kubeconfig_token_file_and_client_certificate_data(standin, tmp_path):
    path = standin.kubeconfig()
    doc = yaml.safe_load(path.read_text())
    (tmp_path / "token").write_text("test-token\n")
    doc["users"][0]["user"] = {"tokenFile": "token"}          # relative to the kubeconfig's directory
    path.write_text(yaml.safe_dump(doc))
    standin.put_secret("demo", "web-tls", {"ca.crt": b"x"})
    async with Client(kconfig.from_kubeconfig(path)) as client:
        assert (await client.get(SECRETS, REF))["metadata"]["name"] == "web-tls"
    from tlsproxy.certs import generate

    pair = generate.issue(standin.ca, "admin", server=False, client=True)
    doc["users"][0]["user"] = {"client-certificate-data": base64.b64encode(pair.cert_pem).decode(),
                               "client-key-data": base64.b64encode(pair.key_pem).decode()}
    path.write_text(yaml.safe_dump(doc))
    cfg = kconfig.from_kubeconfig(path)
    crt, key = cfg.client_cert
    assert crt.read_bytes() == pair.cert_pem and (key.stat().st_mode & 0o777) == 0o600
    cfg.ssl_context()                                         # loads as a client certificate
    doc["users"][0]["user"] = {"client-certificate-data": base64.b64encode(pair.cert_pem).decode()}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="client-certificate and client-key go together"):
        kconfig.from_kubeconfig(path)
