"""config/: every manifest validates strictly against the Kubernetes 1.33 schemas, and the pieces agree."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tlsproxy.cli import build_parser, settings_from_args
from tlsproxy.config import build_settings
from tlsproxy.webhook.injector import CONTAINER_NAME, Injected, InjectOptions, decide
from tlsproxy.webhook.review import PATHS

CONFIG = Path(__file__).resolve().parents[2] / "config"
K8S = "1.33"
# CRDs: kubernetes-validate ships only the built-in API schemas, so these cannot be checked by it.
CRD_GROUPS = {"cert-manager.io": "cert-manager CRD; its schema is not part of Kubernetes' OpenAPI"}
NOT_MANIFESTS = {"kustomization.yaml", "tlsproxy.yaml"}


def manifest_files():
    return sorted(p for p in CONFIG.rglob("*.yaml") if p.name not in NOT_MANIFESTS)


def docs_of(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs():
    return {(p.relative_to(CONFIG).as_posix(), i): d
            for p in manifest_files() for i, d in enumerate(docs_of(p))}


def find(kind, name=None, docs=None):
    docs = all_docs().values() if docs is None else docs
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert hits, f"no {kind} {name}"
    return hits[0]


def validate(doc):
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    if group in CRD_GROUPS:
        return CRD_GROUPS[group]
    kubernetes_validate.validate(doc, K8S, strict=True)
    return None


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(CONFIG).as_posix())
def test_manifest_validates_strictly(path):
    docs = docs_of(path)
    assert docs
    for doc in docs:
        reason = validate(doc)
        if reason:
            assert doc["apiVersion"].startswith("cert-manager.io/"), reason


def test_crd_skips_are_only_cert_manager():
    skipped = [k for k, d in all_docs().items() if validate(d)]
    assert skipped and all(k[0].endswith("certificate.yaml") or k[0].endswith("issuer.yaml") for k in skipped)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (for kustomize)")
@pytest.mark.parametrize("kustomization", ["", "webhook", "cert-manager", "examples", "examples/provisioned"])
def test_kustomize_builds_and_validates(kustomization):
    r = subprocess.run(["kubectl", "kustomize", str(CONFIG / kustomization)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for doc in docs:
        validate(doc)
    if kustomization in ("", "cert-manager"):
        mwc = find("MutatingWebhookConfiguration", "tlsproxy", docs)
        ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        namespace, name = ref.split("/")
        cert = find("Certificate", name, docs)
        assert cert["metadata"]["namespace"] == namespace


def test_webhook_configuration():
    mwc = find("MutatingWebhookConfiguration", "tlsproxy")
    hooks = {h["clientConfig"]["service"]["path"]: h for h in mwc["webhooks"]}
    assert set(hooks) == set(PATHS)
    service = find("Service", "tlsproxy-webhook")
    for path, h in hooks.items():
        assert h["admissionReviewVersions"] == ["v1"] and h["sideEffects"] == "None"
        assert 1 <= h["timeoutSeconds"] <= 10
        svc = h["clientConfig"]["service"]
        meta = service["metadata"]
        assert (svc["name"], svc["namespace"], svc["port"]) == (
            meta["name"], meta["namespace"], service["spec"]["ports"][0]["port"])
        ns_rules = {e["key"]: e for e in h["namespaceSelector"]["matchExpressions"]}
        assert "tlsproxy-system" in ns_rules["kubernetes.io/metadata.name"]["values"]
        assert "kube-system" in ns_rules["kubernetes.io/metadata.name"]["values"]
        label = ns_rules["tlsproxy.io/inject"]
        if PATHS[path]:       # injects by default: only labelled namespaces, and nothing else may fail open
            assert (label["operator"], label["values"]) == ("In", ["enabled"])
            assert h["failurePolicy"] == "Fail"
        else:
            assert label["operator"] == "NotIn" and "enabled" in label["values"]
            assert h["failurePolicy"] == "Ignore"
        # the webhook's own pods never match
        deployment = find("Deployment", "tlsproxy-webhook")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        for expr in h["objectSelector"]["matchExpressions"]:
            assert expr["operator"] == "NotIn" and pod_labels[expr["key"]] in expr["values"]


def _webhook_settings(container):
    ns = build_parser().parse_args(container["args"])
    assert ns.command == "webhook" and ns.image
    return ns, settings_from_args(ns, env={})


def test_webhook_deployment_provisions_its_own_certificate():
    """config/webhook/ alone: --provision-secret names the shipped (empty) Secret, the certificate's
    default names are the Service's, --webhook-configuration names the MutatingWebhookConfiguration."""
    from tlsproxy.k8s.secrets import default_dns_names

    deployment = find("Deployment", "tlsproxy-webhook")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ns, settings = _webhook_settings(container)
    assert settings.listen.port == 9443 and settings.admin.port == 9901
    assert settings.cert_dir is None and "volumes" not in pod["spec"]
    assert pod["spec"]["automountServiceAccountToken"] is True      # the token, for this pod only
    secret = find("Secret", "tlsproxy-webhook-tls")
    meta = secret["metadata"]
    assert settings.provision_secret.name == meta["name"]
    assert secret["type"] == "Opaque" and "data" not in secret and "stringData" not in secret
    service = find("Service", "tlsproxy-webhook")
    names = default_dns_names(settings, settings.provision_secret.resolved(meta["namespace"]))
    assert f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc" in names
    assert ns.webhook_configuration == find("MutatingWebhookConfiguration", "tlsproxy")["metadata"]["name"]
    port = service["spec"]["ports"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["port"] == 443 and named[port["targetPort"]] == 9443
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # the cert-manager install never mounts the token nor keeps caBundle itself
    assert find("ServiceAccount", "tlsproxy-webhook")["automountServiceAccountToken"] is False


def test_webhook_rbac_is_limited_to_its_two_objects():
    role = find("Role", "tlsproxy-webhook-secret")
    assert role["metadata"]["namespace"] == "tlsproxy-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": ["tlsproxy-webhook-tls"], "verbs": ["get", "watch", "update"]}]
    cluster_role = find("ClusterRole", "tlsproxy-webhook-cabundle")
    assert cluster_role["rules"] == [{"apiGroups": ["admissionregistration.k8s.io"],
                                      "resources": ["mutatingwebhookconfigurations"],
                                      "resourceNames": ["tlsproxy"], "verbs": ["get", "watch", "patch"]}]
    for kind, role_kind, name in (("RoleBinding", "Role", "tlsproxy-webhook-secret"),
                                  ("ClusterRoleBinding", "ClusterRole", "tlsproxy-webhook-cabundle")):
        binding = find(kind, name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tlsproxy-webhook",
                                        "namespace": "tlsproxy-system"}]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (for kustomize)")
def test_cert_manager_install_mounts_the_certificate_and_drops_the_provisioning_pieces():
    r = subprocess.run(["kubectl", "kustomize", str(CONFIG / "cert-manager")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Secret"}
    pod = find("Deployment", "tlsproxy-webhook", docs)["spec"]["template"]
    container = pod["spec"]["containers"][0]
    _ns, settings = _webhook_settings(container)
    assert settings.provision_secret is None and pod["spec"]["automountServiceAccountToken"] is False
    mount = container["volumeMounts"][0]
    assert str(settings.cert_dir) == mount["mountPath"] and mount["readOnly"] and "subPath" not in mount
    secret = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])["secret"]["secretName"]
    cert = find("Certificate", "tlsproxy-webhook", docs)
    assert cert["spec"]["secretName"] == secret
    assert "tlsproxy-webhook.tlsproxy-system.svc" in cert["spec"]["dnsNames"]


def test_example_sidecar_is_what_the_injector_writes():
    deployment = find("Deployment", "web")
    template = copy.deepcopy(deployment["spec"]["template"])
    written = template["spec"].pop("initContainers")
    template["spec"].pop("volumes")
    del template["metadata"]["annotations"]["tlsproxy.io/status"]
    d = decide(template, namespace_default=False, options=InjectOptions(image=written[0]["image"]))
    assert isinstance(d, Injected)
    assert [c["name"] for c in written] == [CONTAINER_NAME]
    assert written[0] == d.container
    # and the webhook leaves the written-out Deployment alone
    assert not isinstance(decide(deployment["spec"]["template"], namespace_default=True), Injected)


def test_example_service_and_networkpolicy_expose_only_tls():
    service = find("Service", "web")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "https")]
    policy = find("NetworkPolicy", "web-tls-only")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [{"port": 9443, "protocol": "TCP"}]
    deployment = find("Deployment", "web")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()


def test_sample_config_file_loads():
    settings = build_settings({"config": str(CONFIG / "examples" / "tlsproxy.yaml")}, env={})
    assert settings.listen.port == 9443 and str(settings.cert_dir) == "/etc/tlsproxy/tls"


def test_provisioned_example_rbac_is_exactly_what_its_injected_sidecar_needs():
    """config/examples/provisioned/: the Role grants get/watch/update on the one Secret the injected
    sidecar provisions, to the pod's service account, and the injected pod validates."""
    deployment = find("Deployment", "api")
    template = deployment["spec"]["template"]
    d = decide(template, namespace_default=False, options=InjectOptions(image="tlsproxy:test"))
    assert isinstance(d, Injected)
    settings = settings_from_args(build_parser().parse_args(d.container["args"]), env={})
    secret = find("Secret", settings.provision_secret.name)
    assert secret["type"] == "Opaque" and "data" not in secret
    role = find("Role", "api-tls-provision")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "resourceNames": [secret["metadata"]["name"]],
                              "verbs": ["get", "watch", "update"]}]
    binding = find("RoleBinding", "api-tls-provision")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": template["spec"]["serviceAccountName"],
                                    "namespace": deployment["metadata"]["namespace"]}]
    assert settings.provision_service == ("api",) and find("Service", "api")
