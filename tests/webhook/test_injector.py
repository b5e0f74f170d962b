"""The pure injection policy: table-driven, and checked against `serve`'s parser and the 1.33 schema."""

from __future__ import annotations

import copy

import jsonpatch
import kubernetes_validate
import pytest

from tlsproxy.cli import parse_serve_settings
from tlsproxy.webhook.injector import (
    TLS_MOUNT,
    Denied,
    Injected,
    InjectOptions,
    Skipped,
    apply_patch,
    decide,
)

K8S = "1.33"


def make_pod(annotations=None, *, ports=(8080,), init=None, volumes=None, host_network=False,
             name="web-1", namespace="default"):
    metadata = {"name": name, "namespace": namespace}
    if annotations is not None:
        metadata["annotations"] = dict(annotations)
    spec = {"containers": [{"name": "app", "image": "example/app:1",
                            "ports": [{"containerPort": p} for p in ports]}]}
    if init is not None:
        spec["initContainers"] = init
    if volumes is not None:
        spec["volumes"] = volumes
    if host_network:
        spec["hostNetwork"] = True
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


TEST_OPTIONS = InjectOptions(image="tlsproxy:test")


def injected(pod, *, namespace_default=False, options=TEST_OPTIONS):
    d = decide(pod, namespace_default=namespace_default, options=options)
    assert isinstance(d, Injected), d
    out = jsonpatch.apply_patch(pod, list(d.patch))
    assert out == apply_patch(pod, d.patch)   # our own applier agrees with the library
    kubernetes_validate.validate(out, K8S, strict=True)
    return out, d


def proxy(pod):
    for c in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
        if c["name"] == "tlsproxy":
            return c
    raise AssertionError("no tlsproxy container")


ON = {"tlsproxy.io/inject": "enabled"}


def test_native_sidecar_by_default():
    out, _ = injected(make_pod(ON))
    init = out["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["tlsproxy"]
    c = init[0]
    assert c["restartPolicy"] == "Always"
    assert c["image"] == "tlsproxy:test"
    assert {"name": "https", "containerPort": 9443, "protocol": "TCP"} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9901, "scheme": "HTTP"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz?exclude=upstream", "port": 9901,
                                            "scheme": "HTTP"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    mount = c["volumeMounts"][0]
    assert mount == {"name": "tlsproxy-tls", "mountPath": TLS_MOUNT, "readOnly": True}
    assert "subPath" not in mount
    assert {"name": "tlsproxy-tls", "secret": {"secretName": "default-tls"}} in out["spec"]["volumes"]
    assert out["metadata"]["annotations"]["tlsproxy.io/status"] == "injected"
    assert [c["name"] for c in out["spec"]["containers"]] == ["app"]


def test_classic_sidecar_on_request():
    out, _ = injected(make_pod({**ON, "tlsproxy.io/native-sidecar": "false"}))
    assert "initContainers" not in out["spec"]
    assert [c["name"] for c in out["spec"]["containers"]] == ["tlsproxy", "app"]
    assert "restartPolicy" not in out["spec"]["containers"][0]


def test_existing_init_containers_keep_order_after_proxy():
    init = [{"name": "migrate", "image": "example/migrate:1"}]
    out, d = injected(make_pod(ON, init=init, volumes=[{"name": "data", "emptyDir": {}}]))
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["tlsproxy", "migrate"]
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", "tlsproxy-tls"]
    paths = [op["path"] for op in d.patch]
    assert "/spec/initContainers/0" in paths and "/spec/volumes/-" in paths


def test_missing_parents_are_created_and_slash_is_escaped():
    pod = make_pod(None)                      # no annotations at all (namespace-default path)
    out, d = injected(pod, namespace_default=True)
    paths = [op["path"] for op in d.patch]
    assert paths == ["/spec/initContainers", "/spec/volumes", "/metadata/annotations"]
    pod = make_pod({"other": "x"})
    out, d = injected(pod, namespace_default=True)
    assert d.patch[-1]["path"] == "/metadata/annotations/tlsproxy.io~1status"
    assert out["metadata"]["annotations"] == {"other": "x", "tlsproxy.io/status": "injected"}


def test_generate_name_and_no_namespace_are_fine():
    pod = make_pod(ON)
    del pod["metadata"]["name"], pod["metadata"]["namespace"]
    pod["metadata"]["generateName"] = "web-"
    injected(pod)


@pytest.mark.parametrize("annotations, namespace_default, reason", [
    ({}, False, "no tlsproxy.io/inject annotation"),
    ({"tlsproxy.io/inject": "disabled"}, True, "disabled"),
    ({**ON, "tlsproxy.io/status": "injected"}, False, "already injected"),
])
def test_skips(annotations, namespace_default, reason):
    d = decide(make_pod(annotations), namespace_default=namespace_default)
    assert isinstance(d, Skipped) and reason in d.reason


def test_host_network_is_skipped_with_reason():
    d = decide(make_pod(ON, host_network=True), namespace_default=False)
    assert isinstance(d, Skipped) and "hostNetwork" in d.reason and d.asked


def test_idempotent():
    out, _ = injected(make_pod(ON))
    assert isinstance(decide(out, namespace_default=True), Skipped)
    # a hand-written sidecar named tlsproxy (without the status annotation) is left alone too
    del out["metadata"]["annotations"]["tlsproxy.io/status"]
    d = decide(out, namespace_default=True)
    assert isinstance(d, Skipped) and "named tlsproxy" in d.reason


@pytest.mark.parametrize("annotations, ports, names", [
    ({"tlsproxy.io/inject": "yes"}, (8080,), "tlsproxy.io/inject"),
    ({**ON, "tlsproxy.io/port": "http"}, (8080,), "tlsproxy.io/port"),
    ({**ON, "tlsproxy.io/port": "70000"}, (8080,), "tlsproxy.io/port"),
    ({**ON, "tlsproxy.io/upstream-port": "0"}, (8080,), "tlsproxy.io/upstream-port"),
    ({**ON, "tlsproxy.io/upstream-port": "9443"}, (8080,), "tlsproxy.io/upstream-port"),
    ({**ON}, (8080, 9443), "9443"),                       # the app already uses the TLS port
    ({**ON}, (8080, 9901), "9901"),                       # ... or the admin port
    ({**ON, "tlsproxy.io/admin-port": "9443"}, (8080,), "9443"),
    ({**ON, "tlsproxy.io/http-mode": "upgrade", "tlsproxy.io/http-port": "8081"}, (8080,),
     "tlsproxy.io/http-mode"),
    ({**ON, "tlsproxy.io/http-mode": "redirect"}, (8080,), "tlsproxy.io/http-port"),
    ({**ON, "tlsproxy.io/protocol": "grpc"}, (8080,), "tlsproxy.io/protocol"),
    ({**ON, "tlsproxy.io/secret": "Bad_Name"}, (8080,), "tlsproxy.io/secret"),
    ({**ON, "tlsproxy.io/native-sidecar": "maybe"}, (8080,), "tlsproxy.io/native-sidecar"),
    ({**ON, "tlsproxy.io/allow-uri": "spiffe://x/y"}, (8080,), "tlsproxy.io/allow-uri"),  # no client-ca
    ({**ON, "tlsproxy.io/client-ca": "ca", "tlsproxy.io/allow-uri": "not a uri"}, (8080,),
     "tlsproxy.io/allow-uri"),
    ({**ON, "tlsproxy.io/client-ca": "ca", "tlsproxy.io/allow-dns": "bad name!"}, (8080,),
     "tlsproxy.io/allow-dns"),
    ({**ON, "tlsproxy.io/outbound": "15001"}, (8080,), "tlsproxy.io/outbound"),
    ({**ON, "tlsproxy.io/outbound": "15001=http://api:80"}, (8080,), "tlsproxy.io/outbound"),
    ({**ON, "tlsproxy.io/outbound": "9901=https://api:443"}, (8080,), "9901"),
    ({**ON, "tlsproxy.io/memory-limit": "lots"}, (8080,), "tlsproxy.io/memory-limit"),
    ({**ON, "tlsproxy.io/upstream_port": "8080"}, (8080,), "tlsproxy.io/upstream_port"),  # typo
    ({**ON, "tlsproxy.io/provision-secret": "yes"}, (8080,), "tlsproxy.io/provision-secret"),
    ({**ON, "tlsproxy.io/service": "web"}, (8080,), "tlsproxy.io/provision-secret"),  # needs it
    ({**ON, "tlsproxy.io/provision-secret": "true", "tlsproxy.io/service": "Web_1"}, (8080,),
     "tlsproxy.io/service"),
    ({**ON, "tlsproxy.io/outbound-ca-secret": "Bad/Name"}, (8080,), "tlsproxy.io/outbound-ca-secret"),
    ({**ON, "tlsproxy.io/outbound-ca-secret": "a/b/c"}, (8080,), "tlsproxy.io/outbound-ca-secret"),
    ({**ON, "tlsproxy.io/outbound-cert-secret": ""}, (8080,), "tlsproxy.io/outbound-cert-secret"),
])
def test_denials_name_the_annotation(annotations, ports, names):
    d = decide(make_pod(annotations, ports=ports), namespace_default=False)
    assert isinstance(d, Denied), d
    assert names in d.reason


def test_existing_volume_name_is_denied():
    d = decide(make_pod(ON, volumes=[{"name": "tlsproxy-tls", "emptyDir": {}}]), namespace_default=False)
    assert isinstance(d, Denied) and "tlsproxy-tls" in d.reason


FULL = {
    **ON,
    "tlsproxy.io/upstream-port": "8000",
    "tlsproxy.io/port": "8443",
    "tlsproxy.io/admin-port": "9902",
    "tlsproxy.io/secret": "web-tls",
    "tlsproxy.io/http-port": "8081",
    "tlsproxy.io/http-mode": "forward",
    "tlsproxy.io/client-ca": "mesh-ca",
    "tlsproxy.io/allow-uri": "spiffe://cluster.local/ns/shop/sa/front, spiffe://cluster.local/ns/shop/sa/api",
    "tlsproxy.io/allow-dns": "front.shop.svc",
    "tlsproxy.io/allow-cn": "front",
    "tlsproxy.io/allow-ou": "shop",
    "tlsproxy.io/outbound": "15001=https://payments.pay.svc:443,127.0.0.1:15002=https://db.data.svc:9443",
    "tlsproxy.io/log-level": "debug",
    "tlsproxy.io/cpu-request": "50m",
    "tlsproxy.io/memory-request": "64Mi",
    "tlsproxy.io/cpu-limit": "1",
    "tlsproxy.io/memory-limit": "512Mi",
}


def test_every_annotation_reaches_serve_parser():
    out, _ = injected(make_pod(FULL, ports=(8000,)))
    c = proxy(out)
    assert c["args"][0] == "serve"
    s = parse_serve_settings(c["args"][1:], env={})
    assert (s.listen.host, s.listen.port) == ("", 8443)
    assert (s.admin.host, s.admin.port) == ("", 9902)
    assert str(s.upstream) == "http://127.0.0.1:8000"
    assert str(s.cert_dir) == TLS_MOUNT
    assert str(s.client_ca) == "/etc/tlsproxy/client-ca/ca.crt"     # --client-ca implies mutual TLS
    assert s.allow_uri == ("spiffe://cluster.local/ns/shop/sa/front", "spiffe://cluster.local/ns/shop/sa/api")
    assert s.allow_dns == ("front.shop.svc",) and s.allow_cn == ("front",) and s.allow_ou == ("shop",)
    assert s.http_listen.port == 8081 and s.http_mode == "forward"
    # a bare outbound port listens on loopback only: the plain side must not be reachable from other pods
    assert s.outbound == ("127.0.0.1:15001=https://payments.pay.svc:443",
                          "127.0.0.1:15002=https://db.data.svc:9443")
    assert s.log_level == "debug"
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}}
    assert c["startupProbe"]["httpGet"]["port"] == 9902
    assert {"name": "tlsproxy-client-ca", "configMap": {"name": "mesh-ca"}} in out["spec"]["volumes"]
    assert {p["containerPort"] for p in c["ports"]} == {8443, 9902, 8081}


def test_tcp_protocol_and_defaults_reach_serve_parser():
    out, _ = injected(make_pod({**ON, "tlsproxy.io/protocol": "tcp", "tlsproxy.io/upstream-port": "5432"},
                               ports=(5432,)))
    s = parse_serve_settings(proxy(out)["args"][1:], env={})
    assert s.protocol == "tcp" and str(s.upstream) == "tcp://127.0.0.1:5432"
    out, _ = injected(make_pod(ON, ports=()))
    s = parse_serve_settings(proxy(out)["args"][1:], env={})
    assert str(s.upstream) == "http://127.0.0.1:8080" and s.listen.port == 9443 and s.admin.port == 9901


def test_upstream_port_defaults_to_first_declared_port():
    out, _ = injected(make_pod(ON, ports=(3000, 3001)))
    assert "http://127.0.0.1:3000" in proxy(out)["args"]


def test_require_client_cert_uses_the_secrets_own_ca():
    annotations = {**ON, "tlsproxy.io/require-client-cert": "true",
                   "tlsproxy.io/allow-uri": "spiffe://cluster.local/ns/shop/sa/front"}
    out, _ = injected(make_pod(annotations))
    s = parse_serve_settings(proxy(out)["args"][1:], env={})
    assert s.client_ca is None and s.require_client_cert is True
    assert s.allow_uri == ("spiffe://cluster.local/ns/shop/sa/front",)
    assert [v["name"] for v in out["spec"]["volumes"]] == ["tlsproxy-tls"]


def test_client_ca_cannot_be_made_optional():
    d = decide(make_pod({**ON, "tlsproxy.io/client-ca": "ca", "tlsproxy.io/require-client-cert": "false"}),
               namespace_default=False)
    assert isinstance(d, Denied) and "tlsproxy.io/require-client-cert" in d.reason


def test_input_is_not_mutated():
    pod = make_pod(FULL, ports=(8000,))
    before = copy.deepcopy(pod)
    injected(pod)
    assert pod == before


def test_schema_validation_is_strict():
    """Guard: the validator really rejects an unknown field (else every check above proves nothing)."""
    out, _ = injected(make_pod(ON))
    proxy(out)["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(out, K8S, strict=True)


def test_provision_secret_follows_the_secret_through_the_api_with_its_own_token():
    pod = make_pod({**ON, "tlsproxy.io/provision-secret": "true", "tlsproxy.io/secret": "web-tls",
                    "tlsproxy.io/service": "web,web-internal", "tlsproxy.io/require-client-cert": "true"})
    pod["spec"]["automountServiceAccountToken"] = False       # the app needs no token; the sidecar gets one
    out, _d = injected(pod)
    c = proxy(out)
    s = parse_serve_settings(c["args"][1:], env={})
    assert str(s.provision_secret) == "web-tls" and s.cert_dir is None
    assert s.provision_service == ("web", "web-internal") and s.require_client_cert
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert "tlsproxy-tls" not in volumes                      # nothing mounted from the Secret
    sources = volumes["tlsproxy-kube-api"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    assert sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert c["volumeMounts"] == [{"name": "tlsproxy-kube-api", "readOnly": True,
                                  "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    app = next(x for x in out["spec"]["containers"] if x["name"] == "app")
    assert "volumeMounts" not in app                          # the token is the sidecar's alone


def test_outbound_secrets_become_flags_and_a_mount():
    pod = make_pod({**ON, "tlsproxy.io/outbound": "15001=https://core-interceptors.tekton-pipelines.svc:8443",
                    "tlsproxy.io/outbound-ca-secret": "tekton-pipelines/core-interceptors-tls",
                    "tlsproxy.io/outbound-cert-secret": "el-client-tls"})
    out, _d = injected(pod)
    c = proxy(out)
    s = parse_serve_settings(c["args"][1:], env={})
    assert str(s.outbound_ca_secret) == "tekton-pipelines/core-interceptors-tls"
    assert str(s.outbound_cert_dir) == "/etc/tlsproxy/outbound" and str(s.cert_dir) == "/etc/tlsproxy/tls"
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["tlsproxy-outbound-tls"]["secret"]["secretName"] == "el-client-tls"
    assert "tlsproxy-kube-api" in volumes
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"tlsproxy-tls": "/etc/tlsproxy/tls", "tlsproxy-outbound-tls": "/etc/tlsproxy/outbound",
                      "tlsproxy-kube-api": "/var/run/secrets/kubernetes.io/serviceaccount"}
