"""deploy/k8s: the kustomize base and its dev and prod overlays, rendered and checked statically.

No kustomize binary is needed: ``render`` below applies the few kustomize features the manifests use
(``resources``, ``namespace``, ``images``, ``labels`` and strategic-merge ``patches`` of one object per
file, with kustomize's list-merge order) and refuses every other field, so that what is tested is what
``kubectl kustomize deploy/k8s/overlays/<overlay>`` renders; when a kubectl with kustomize v4+ is on PATH,
a test compares the two.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
# The Kubernetes version the manifests must be valid for (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.31"

PORTS = {"gateway": 8000, "auth": 8001, "inventory": 8002, "orders": 8003, "audit": 8004}
PROCESSES = tuple(PORTS)
SERVICES = PROCESSES[1:]
COMPONENTS = (*PROCESSES, "migrate", "check")
UID = 10001
# A container listens on every interface of its own network namespace; the Service and NetworkPolicies
# decide who reaches it.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
# Scratch space on a read-only root file system: an emptyDir, private to the pod.
TMP = "/tmp"  # noqa: S108
# uvicorn's graceful shutdown (comptoir/serve.py: timeout_graceful_shutdown=10).
UVICORN_GRACE_SECONDS = 10

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "labels", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
# patchMergeKey of the lists these manifests patch (k8s.io/api); every other list is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
}

SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "PRIVATE")
# Settings whose names contain such a word but that hold no secret (public keys, claims, a path, a
# link template, durations, lengths and counts).
NOT_SECRETS = {"AUDIT_CHECKPOINT_TRUSTED_KEYS", "TOKEN_ISSUER", "TOKEN_AUDIENCE"}
NOT_SECRET_SUFFIXES = ("_FILE", "_LINK", "_SECONDS", "_LENGTH", "_ROUNDS", "_ATTEMPTS", "_FAILURES")
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

# Which Secret keys each workload receives: each process only its own (compare docker-compose.yml).
EXPECTED_SECRET_KEYS = {
    "gateway": {"GATEWAY_CLIENT_SECRET", "REDIS_PASSWORD"},
    "auth": {
        "AUTH_DB_PASSWORD",
        "AUTH_CLIENT_SECRET",
        "AUTH_SERVICE_CLIENTS",
        "AUTH_OTP_HMAC_KEY",
        "AUTH_SIGNING_KEYS",
        "AUTH_WEBHOOK_SECRET",
        "BOOTSTRAP_ADMIN_EMAIL",
        "BOOTSTRAP_ADMIN_PASSWORD",
    },
    "inventory": {"INVENTORY_DB_PASSWORD", "INVENTORY_CLIENT_SECRET"},
    "orders": {"ORDERS_DB_PASSWORD", "ORDERS_CLIENT_SECRET"},
    "audit": {"AUDIT_DB_PASSWORD", "AUDIT_CLIENT_SECRET"},
    "migrate": {"POSTGRES_ADMIN_PASSWORD", *(f"{s.upper()}_DB_PASSWORD" for s in SERVICES)},
}
# The deploy check sees what every process sees (as docker compose's `check` tool does), the owner's
# password (the database checks) and the backup key.
EXPECTED_SECRET_KEYS["check"] = {
    *(key for process in PROCESSES for key in EXPECTED_SECRET_KEYS[process]),
    "POSTGRES_ADMIN_PASSWORD",
    "BACKUP_ENCRYPTION_KEY",
}
# Who may hold the database owner's password.
OWNER_COMPONENTS = {"migrate", "check"}

# Who may open a connection to whom (DESIGN.md's processes; the table atop base/networkpolicies.yaml).
INGRESS_CONTROLLER = "ingress-controller"
PROMETHEUS = "prometheus"
EXPECTED_EDGES = {
    (INGRESS_CONTROLLER, "gateway"),
    *(("gateway", service) for service in SERVICES),
    ("orders", "inventory"),
    *((caller, "auth") for caller in ("inventory", "orders", "audit")),
    *((caller, "audit") for caller in ("auth", "inventory", "orders")),
    ("auth", "orders"),
    *((PROMETHEUS, process) for process in PROCESSES),
}
# Pods outside the namespace that the policies name: (namespace labels, pod labels).
OUTSIDE_PODS = {
    INGRESS_CONTROLLER: (
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"app.kubernetes.io/name": "ingress-nginx"},
    ),
    PROMETHEUS: ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"}),
    "kube-dns": ({"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"}),
}
EXTERNAL_PORTS = {"postgres": 5432, "redis": 6379, "webhook": 443}
EXPECTED_EXTERNAL = {
    "dev": {("postgres", c) for c in (*SERVICES, *OWNER_COMPONENTS)},
    "prod": {("postgres", c) for c in (*SERVICES, *OWNER_COMPONENTS)} | {("redis", "gateway"), ("webhook", "auth")},
}
PLACEHOLDER_NETWORK = ipaddress.ip_network("192.0.2.0/24")


# ---------------------------------------------------------------- rendering (a small kustomize)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge: maps merge (null deletes a key), keyed lists merge by their key with
    the patch's items first (kustomize's order), every other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    merge_key = MERGE_KEYS.get(field)
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        originals = {item[merge_key]: item for item in base}
        patched = [strategic_merge(originals.get(item[merge_key], {}), item, field) for item in patch]
        keys = {item[merge_key] for item in patch}
        return patched + [copy.deepcopy(item) for item in base if item[merge_key] not in keys]
    return copy.deepcopy(patch)


def pod_template(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"])
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"])
    return None


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    template = pod_template(doc)
    return None if template is None else dict(template["spec"])


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def set_image(container: dict[str, Any], rule: dict[str, Any]) -> None:
    name, sep, tag = container["image"].partition(":")
    if name != rule["name"]:
        return
    image = rule.get("newName", name)
    if "digest" in rule:
        container["image"] = f"{image}@{rule['digest']}"
    else:
        container["image"] = f"{image}:{rule['newTag']}" if "newTag" in rule else f"{image}{sep}{tag}"


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints, for the kustomize subset used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{directory}: fields this test cannot render: {sorted(unsupported)}"
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_yaml_documents(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only `- path: file` patches are rendered here"
        (patch,) = load_yaml_documents(directory / entry["path"])
        ident = (patch["kind"], patch["metadata"]["name"])
        matches = [i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == ident]
        assert len(matches) == 1, f"{entry['path']} matches {len(matches)} objects"
        if patch.get("$patch") == "delete":
            del docs[matches[0]]
        else:
            docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        spec = pod_spec(doc)
        for rule in kustomization.get("images", []):
            for container in containers_of(spec) if spec else []:
                set_image(container, rule)
        for labels in kustomization.get("labels", []):
            assert set(labels) == {"pairs"}, "only plain `labels: - pairs:` (metadata labels) are rendered here"
            doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **labels["pairs"]}
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> list[dict[str, Any]]:
    return rendered[overlay]


# ---------------------------------------------------------------- helpers over the rendered objects


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(component, object, pod spec) of every Deployment, Job and CronJob."""
    for doc in docs:
        template = pod_template(doc)
        if template is not None:
            yield template["metadata"]["labels"]["app.kubernetes.io/component"], doc, dict(template["spec"])


def config_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(of_kind(docs, "ConfigMap")["comptoir-config"]["data"])


def is_secret_name(name: str) -> bool:
    if name in NOT_SECRETS or name.endswith(NOT_SECRET_SUFFIXES):
        return False
    return any(word in name.upper() for word in SECRET_WORDS)


class SecretValue(str):
    """A value that comes from a Secret (the test stands in for it)."""


def environment(docs: list[dict[str, Any]], container: dict[str, Any], secret_value: Any = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in order with
    $(VAR) expanded from what is defined before. Secret values come from ``secret_value(name, key)``."""
    configmaps = of_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) <= {"configMapRef", "secretRef", "prefix"}, source
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            if secret_value is None:
                env[item["name"]] = SecretValue(f"secret.{ref['name']}.{ref['key']}")
                continue
            value = secret_value(ref["name"], ref["key"])
            assert value is not None or ref.get("optional"), f"no value for the Secret key {ref['key']}"
            if value is not None:
                env[item["name"]] = SecretValue(value)
            continue
        unresolved = [name for name in REFERENCE.findall(item["value"]) if name not in env]
        assert not unresolved, f"{container['name']}: {item['name']} refers to undefined {unresolved}"
        env[item["name"]] = REFERENCE.sub(lambda match: env[match.group(1)], item["value"])
    return env


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """env name -> its secretKeyRef."""
    return {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def effective_security(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    return {**spec.get("securityContext", {}), **container.get("securityContext", {})}


def quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def port_number(port: int | str, container: dict[str, Any]) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(number)


# ---------------------------------------------------------------- the rendering itself


def test_every_kustomization_uses_only_what_the_renderer_implements() -> None:
    found = sorted(K8S.rglob("kustomization.yaml"))
    assert [p.parent.relative_to(K8S).as_posix() for p in found] == ["base", "overlays/dev", "overlays/prod"]
    for path in found:
        kustomization = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert kustomization["kind"] == "Kustomization"
        assert set(kustomization) <= KUSTOMIZATION_FIELDS, path
        for entry in kustomization.get("patches", []):
            assert len(load_yaml_documents(path.parent / entry["path"])) == 1, entry


def _kubectl_kustomize() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        version = subprocess.run(
            [kubectl, "version", "--client", "--output=json"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v(\d+)\.", json.loads(version.stdout or "{}").get("kustomizeVersion", ""))
    return kubectl if match and int(match.group(1)) >= 4 else None


def test_the_renderer_agrees_with_kubectl_kustomize(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    kubectl = _kubectl_kustomize()
    if kubectl is None:
        pytest.skip("no kubectl with kustomize v4+ on PATH: the renderer of this file stands in for it")
    output = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert output.returncode == 0, output.stderr
    theirs = [doc for doc in yaml.safe_load_all(output.stdout) if doc]

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(theirs, key=key) == sorted(rendered[overlay], key=key)


def test_every_manifest_is_valid_for_the_pinned_kubernetes_version(docs: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (it belongs in the dev extras)"
    )
    assert len(docs) > 25
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except Exception as exc:  # ValidationError carries the path; say which object failed
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(exc, 'message', exc)}")


# ---------------------------------------------------------------- workloads


def test_one_deployment_per_process_and_a_migration_job(docs: list[dict[str, Any]]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert set(deployments) == {f"comptoir-{process}" for process in PROCESSES}
    (job,) = of_kind(docs, "Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["comptoir", "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    images = {c["image"] for _, _, spec in workloads(docs) for c in containers_of(spec)}
    assert len(images) == 1, f"one image for every process, got {images}"
    assert images.pop().split("@")[0].split(":")[0].endswith("comptoir")


@pytest.mark.parametrize("process", PROCESSES)
def test_each_deployment_runs_its_process_on_its_port(docs: list[dict[str, Any]], process: str) -> None:
    deployment = of_kind(docs, "Deployment")[f"comptoir-{process}"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    port = PORTS[process]
    assert container["command"] == [
        "python", "-m", "comptoir.serve", process, "--host", ALL_INTERFACES, "--port", str(port)
    ]  # fmt: skip
    assert [p["containerPort"] for p in container["ports"]] == [port]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == process
    # Prometheus scrapes the process's own port (deploy/prometheus/prometheus.yml).
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_every_container_is_confined(docs: list[dict[str, Any]]) -> None:
    for component, doc, spec in workloads(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, where
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), where
        for volume in spec.get("volumes", []):
            sources = set(volume) - {"name"}
            assert len(sources) == 1, f"{where}: volume {volume['name']} has sources {sources}"
            assert sources <= {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected"}, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers_of(spec):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            security = effective_security(spec, container)
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser") == UID, where
            assert security.get("runAsGroup") == UID, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert not security.get("privileged"), where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request, f"{where}: no {resource} request"
                assert limit, f"{where}: no {resource} limit"
                assert quantity(request) <= quantity(limit), f"{where}: {resource} request above its limit"
            # A read-only root file system: scratch space and DATA_DIR are emptyDirs (or volumes).
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts[TMP]["name"]], where
            assert not mounts["/data"].get("readOnly"), where
            assert environment(docs, container)["DATA_DIR"] == "/data", where
        assert component in COMPONENTS, where


@pytest.mark.parametrize("process", PROCESSES)
def test_probes_ask_the_process_its_health_on_its_own_port(docs: list[dict[str, Any]], process: str) -> None:
    (container,) = of_kind(docs, "Deployment")[f"comptoir-{process}"]["spec"]["template"]["spec"]["containers"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert port_number(http["port"], container) == PORTS[process], probe
        assert http.get("scheme", "HTTP") == "HTTP"


def test_pods_drain_before_they_stop(docs: list[dict[str, Any]]) -> None:
    for process in PROCESSES:
        spec = of_kind(docs, "Deployment")[f"comptoir-{process}"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if process == "gateway":
            assert command[:1] == ["sleep"], "the gateway must drain in a preStop"
        drain = int(command[1]) if command[:1] == ["sleep"] else 0
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace >= 20, process
        assert grace >= drain + UVICORN_GRACE_SECONDS, f"{process}: preStop + graceful shutdown exceed the grace"


# ---------------------------------------------------------------- secrets and settings


def test_secrets_come_only_from_secret_references(docs: list[dict[str, Any]]) -> None:
    for _, doc, spec in workloads(docs):
        for container in containers_of(spec):
            where = f"{doc['metadata']['name']}/{container['name']}"
            refs = secret_refs(container)
            for item in container.get("env", []):
                if is_secret_name(item["name"]):
                    assert item["name"] in refs, f"{where}: {item['name']} must come from a secretKeyRef"
                assert set(item.get("valueFrom", {})) <= {"secretKeyRef"}, f"{where}: {item['name']}"
            # Credentials inside URLs are only references to Secret-backed variables.
            for item in container.get("env", []):
                if "value" not in item:
                    continue
                password = urlsplit(item["value"]).password if "://" in item["value"] else None
                if password:
                    referenced = REFERENCE.fullmatch(password)
                    assert referenced, f"{where}: {item['name']} embeds a password"
                    assert referenced.group(1) in refs, f"{where}: {item['name']}'s password is not from a Secret"
    for name, configmap in of_kind(docs, "ConfigMap").items():
        for key, value in configmap.get("data", {}).items():
            assert not is_secret_name(key), f"ConfigMap {name}: {key} looks like a secret"
            assert not ("://" in value and urlsplit(value).password), f"ConfigMap {name}: {key} holds a password"


def test_secret_manifests_only_in_dev_and_only_placeholders(docs: list[dict[str, Any]], overlay: str) -> None:
    manifests = of_kind(docs, "Secret")
    if overlay == "prod":
        assert manifests == {}, "production Secrets are created outside git"
        return
    assert manifests
    for name, manifest in manifests.items():
        assert "data" not in manifest, f"{name}: use stringData with readable placeholders"
        for key, value in manifest["stringData"].items():
            if key == "AUTH_SERVICE_CLIENTS":
                digests = json.loads(value)
                clients = manifests["comptoir-clients"]["stringData"]
                for process in PROCESSES:
                    secret = clients[f"{process.upper()}_CLIENT_SECRET"]
                    assert digests[process] == hashlib.sha256(secret.encode()).hexdigest(), process
            else:
                assert value.startswith("change-me"), f"{name}/{key} is not an obvious placeholder"


def test_each_workload_receives_only_its_own_secrets(docs: list[dict[str, Any]]) -> None:
    received = {
        component: {ref["key"] for c in containers_of(spec) for ref in secret_refs(c).values()}
        for component, _, spec in workloads(docs)
    }
    assert received == EXPECTED_SECRET_KEYS
    for component, _, spec in workloads(docs):
        for container in containers_of(spec):
            assert not [s for s in container.get("envFrom", []) if "secretRef" in s], component
            owner_secret = {r["name"] for r in secret_refs(container).values()} & {"comptoir-database-admin"}
            assert not owner_secret or component in OWNER_COMPONENTS, "only migrate and check get the owner's password"


def test_every_referenced_secret_is_provided_or_documented(docs: list[dict[str, Any]], overlay: str) -> None:
    references = {
        (ref["name"], ref["key"])
        for _, _, spec in workloads(docs)
        for c in containers_of(spec)
        for ref in secret_refs(c).values()
        if not ref.get("optional")
    }
    volumes = {
        v["secret"]["secretName"] for _, _, spec in workloads(docs) for v in spec.get("volumes", []) if "secret" in v
    }
    volumes |= {
        tls["secretName"] for ingress in of_kind(docs, "Ingress").values() for tls in ingress["spec"].get("tls", [])
    }
    if overlay == "dev":
        provided = {(name, key) for name, s in of_kind(docs, "Secret").items() for key in s["stringData"]}
        assert sorted(references - provided) == [], "the dev overlay must start without any external Secret"
        assert volumes == set()
        return
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    for name in {name for name, _ in references} | volumes:
        assert name in readme, f"deploy/k8s/README.md does not say how to create the Secret {name}"
    for name, key in references:
        assert key in readme, f"deploy/k8s/README.md does not name {name}/{key}"


def _stand_in_secrets(docs: list[dict[str, Any]], overlay: str) -> Any:
    """dev: the overlay's own placeholder Secrets; prod: strong random values (digests where needed)."""
    if overlay == "dev":
        provided = of_kind(docs, "Secret")
        return lambda name, key: provided.get(name, {}).get("stringData", {}).get(key)
    client_secrets = {p: secrets.token_urlsafe(32) for p in PROCESSES}

    def value(_name: str, key: str) -> str | None:
        if key == "AUTH_SERVICE_CLIENTS":
            return json.dumps({p: hashlib.sha256(s.encode()).hexdigest() for p, s in client_secrets.items()})
        if key.endswith("_CLIENT_SECRET"):
            return client_secrets[key.removesuffix("_CLIENT_SECRET").lower()]
        if key.startswith("BOOTSTRAP_ADMIN_"):
            return None  # optional, and absent once the first administrator exists
        return secrets.token_urlsafe(32)

    return value


def test_every_env_reference_resolves(docs: list[dict[str, Any]], overlay: str) -> None:
    supply = _stand_in_secrets(docs, overlay)
    for _, doc, spec in workloads(docs):
        for container in containers_of(spec):
            env = environment(docs, container, supply)  # asserts each $(VAR) is defined before its use
            for name, value in env.items():
                assert "$(" not in value, f"{doc['metadata']['name']}: {name} keeps an unexpanded reference"


def test_the_rendered_settings_pass_comptoir_s_own_checks(
    docs: list[dict[str, Any]], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process builds its settings from exactly the environment Kubernetes would give it; in prod,
    no critical deployment check fails (the process would refuse to start)."""
    from common.deploychecks import service_checks
    from gateway.checks import gateway_checks
    from gateway.config import GatewaySettings
    from services.audit.config import Settings as AuditSettings
    from services.auth.checks import auth_checks
    from services.auth.config import Settings as AuthSettings
    from services.inventory.config import Settings as InventorySettings
    from services.orders.config import Settings as OrdersSettings

    monkeypatch.chdir(tmp_path)  # no .env file
    supply = _stand_in_secrets(docs, overlay)
    builders = {
        "gateway": lambda: gateway_checks(GatewaySettings()),
        "auth": lambda: auth_checks(AuthSettings()),
        "inventory": lambda: service_checks(InventorySettings(), "inventory"),
        "orders": lambda: service_checks(OrdersSettings(), "orders"),
        "audit": lambda: service_checks(AuditSettings(), "audit"),
    }
    for process, build in builders.items():
        (container,) = of_kind(docs, "Deployment")[f"comptoir-{process}"]["spec"]["template"]["spec"]["containers"]
        env = environment(docs, container, supply)
        with mock.patch.dict(os.environ, env, clear=True):
            checks = build()
        failing = [f"{c.id} {c.title}: {c.problem}" for c in checks if c.critical and not c.ok]
        if overlay == "prod":
            assert env["ENVIRONMENT"] == "production"
            assert failing == [], process


def setting_names() -> set[str]:
    """Every environment variable some Comptoir process reads as a setting."""
    from pydantic import AliasChoices

    from comptoir.config import RunSettings
    from gateway.config import GatewaySettings
    from services.audit.config import Settings as AuditSettings
    from services.auth.config import Settings as AuthSettings
    from services.inventory.config import Settings as InventorySettings
    from services.orders.config import Settings as OrdersSettings

    names = set()
    for cls in (RunSettings, GatewaySettings, AuthSettings, InventorySettings, OrdersSettings, AuditSettings):
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.add(str(alias.choices[0]))
            elif isinstance(alias, str):
                names.add(alias)
            else:
                names.add((prefix + field_name).upper())
    return names


# Variables no process reads as a setting: read by asyncpg itself (PGSSLROOTCERT), or only parts of a
# URL that Kubernetes composes with $(VAR).
LIBPQ_VARIABLES = {"PGSSLROOTCERT"}


def test_every_configured_variable_is_a_real_setting(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt setting would be ignored without a word (the settings classes ignore extra variables)."""
    settings = setting_names()
    assert {"ALLOWED_HOSTS", "GATEWAY_AUTH_URL", "AUTH_WEBHOOK_URL", "ORDERS_INVENTORY_URL"} <= settings
    names: set[str] = set()
    composed: set[str] = set()  # parts of the URLs some overlay composes with $(VAR)
    for docs in rendered.values():
        names |= set(config_data(docs))
        for _, _, spec in workloads(docs):
            for container in containers_of(spec):
                for item in container.get("env", []):
                    names.add(item["name"])
                    composed |= set(REFERENCE.findall(item.get("value", "")))
    assert sorted(names - settings - LIBPQ_VARIABLES - composed) == [], "neither a setting nor part of a URL"


def test_prod_talks_tls_to_postgres_and_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["prod"]
    config = config_data(docs)
    assert config["ENVIRONMENT"] == "production"
    assert config["TLS_TERMINATING_PROXY"] == "true"
    for component, doc, spec in workloads(docs):
        (container,) = spec["containers"]
        env = environment(docs, container)
        urls = {name: value for name, value in env.items() if name.endswith("DATABASE_URL")}
        assert bool(urls) == (component != "gateway"), doc["metadata"]["name"]
        for name, url in urls.items():
            parts = urlsplit(url)
            assert parts.scheme == "postgresql", name
            assert parts.hostname, name
            assert parse_qs(parts.query)["sslmode"] == ["verify-full"], name
        if urls:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert any(env["PGSSLROOTCERT"].startswith(path + "/") for path in mounts), "the CA is mounted"
    (gateway,) = of_kind(docs, "Deployment")["comptoir-gateway"]["spec"]["template"]["spec"]["containers"]
    redis_url = environment(docs, gateway)["REDIS_URL"]
    assert urlsplit(redis_url).scheme == "rediss"
    assert urlsplit(redis_url).hostname


def test_prod_keeps_keys_and_uploads_out_of_the_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["prod"]
    deployments = of_kind(docs, "Deployment")
    # auth: every pod signs with the same keys, from a Secret.
    (auth,) = deployments["comptoir-auth"]["spec"]["template"]["spec"]["containers"]
    for key in ("AUTH_SIGNING_KEYS", "AUTH_OTP_HMAC_KEY"):
        assert not secret_refs(auth)[key].get("optional"), key
    # inventory: images on the shared claim.
    inventory = deployments["comptoir-inventory"]["spec"]["template"]["spec"]
    (container,) = inventory["containers"]
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}["/data/uploads"]
    volume = {v["name"]: v for v in inventory["volumes"]}[mount["name"]]
    claim = of_kind(docs, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    # audit: the checkpoint key from a Secret volume.
    audit = deployments["comptoir-audit"]["spec"]["template"]["spec"]
    (container,) = audit["containers"]
    key_file = environment(docs, container)["AUDIT_CHECKPOINT_KEY_FILE"]
    volumes = {v["name"]: v for v in audit["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    assert "secret" in volumes[mount["name"]]
    assert mount.get("readOnly") is True


# ---------------------------------------------------------------- services, ingress, scaling


def test_services_are_internal_and_select_their_process(docs: list[dict[str, Any]]) -> None:
    services = of_kind(docs, "Service")
    assert set(services) == {f"comptoir-{process}" for process in PROCESSES}
    for process in PROCESSES:
        service = services[f"comptoir-{process}"]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", process
        deployment = of_kind(docs, "Deployment")[f"comptoir-{process}"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), process
        others = [
            d
            for d in of_kind(docs, "Deployment").values()
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert others == [deployment], f"{process}'s Service selects other pods too"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (port,) = service["spec"]["ports"]
        assert port["port"] == PORTS[process]
        assert port_number(port["targetPort"], container) == PORTS[process]


def test_only_the_gateway_api_is_exposed_by_the_ingress(docs: list[dict[str, Any]], overlay: str) -> None:
    (ingress,) = of_kind(docs, "Ingress").values()
    spec = ingress["spec"]
    assert "defaultBackend" not in spec
    hosts = []
    for rule in spec["rules"]:
        hosts.append(rule["host"])
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["name"] == "comptoir-gateway"
            assert path["backend"]["service"]["port"] in ({"name": "http"}, {"number": 8000})
            assert path["path"].startswith("/api/"), "only the API: /metrics, /healthz and /readyz stay inside"
    assert sorted(hosts) == sorted(config_data(docs)["ALLOWED_HOSTS"].split(","))
    if overlay == "prod":
        assert {h for tls in spec["tls"] for h in tls["hosts"]} >= set(hosts)
    # Nothing else is published: no NodePort or LoadBalancer Service, no host port.
    for name, service in of_kind(docs, "Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name
    for _, doc, spec in workloads(docs):
        for container in containers_of(spec):
            assert not [p for p in container.get("ports", []) if "hostPort" in p], doc["metadata"]["name"]


def test_autoscalers_and_disruption_budgets(docs: list[dict[str, Any]], overlay: str) -> None:
    deployments = of_kind(docs, "Deployment")
    autoscalers = of_kind(docs, "HorizontalPodAutoscaler")
    targets = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in autoscalers.values()}
    assert set(targets) <= set(deployments)
    if overlay == "prod":
        assert set(targets) == set(deployments), "the gateway and every service scale out"
    for name, hpa in targets.items():
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the replica count"
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        assert any(m["type"] == "Resource" for m in hpa["spec"]["metrics"]), name
    gateway_hpa = targets.get("comptoir-gateway")
    replicas = (
        gateway_hpa["spec"]["maxReplicas"]
        if gateway_hpa
        else deployments["comptoir-gateway"]["spec"].get("replicas", 1)
    )
    assert int(config_data(docs)["GATEWAY_REPLICAS"]) == replicas, "GATEWAY_REPLICAS is the most gateways that run"
    budgets = of_kind(docs, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert budget["spec"].get("maxUnavailable", 0) >= 1, f"{name}: a drain must be able to evict a pod"


def test_the_namespace_enforces_the_restricted_pod_security_standard(docs: list[dict[str, Any]]) -> None:
    (namespace,) = of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {
        namespace["metadata"]["name"]
    }


# ---------------------------------------------------------------- network policies


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if (
            (operator == "In" and value not in expression["values"])
            or (operator == "NotIn" and value in expression["values"])
            or (operator == "Exists" and not present)
            or (operator == "DoesNotExist" and present)
        ):
            return False
    return True


def _peer_matches(peer: dict[str, Any], namespace: dict[str, str], pod: dict[str, str], own: dict[str, str]) -> bool:
    """Whether a NetworkPolicyPeer admits a pod (with its namespace's labels); ``own`` = the policy's namespace."""
    if "ipBlock" in peer:
        return False
    in_namespace = _selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer else namespace == own
    return in_namespace and _selects(peer.get("podSelector", {}), pod)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str = "TCP") -> bool:
    if not ports:
        return True
    for item in ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        if "port" not in item or item["port"] <= port <= item.get("endPort", item["port"]):
            return True
    return False


def _allowed(
    policies: list[dict[str, Any]],
    direction: str,
    subject: dict[str, str],
    peer: tuple[dict[str, str], dict[str, str]] | ipaddress.IPv4Network,
    port: int,
    own: dict[str, str],
    protocol: str = "TCP",
) -> bool:
    """Whether the policies let ``subject`` (a pod of this namespace) send/receive this traffic."""
    policy_type = "Ingress" if direction == "ingress" else "Egress"
    relevant = [
        p for p in policies if _selects(p["spec"]["podSelector"], subject) and policy_type in p["spec"]["policyTypes"]
    ]
    if not relevant:
        return True  # not isolated in that direction
    key = "from" if direction == "ingress" else "to"
    for policy in relevant:
        for rule in policy["spec"].get(direction, []):
            if not _port_matches(rule.get("ports"), port, protocol):
                continue
            for rule_peer in rule.get(key, [{}]) or [{}]:
                if isinstance(peer, ipaddress.IPv4Network):
                    block = rule_peer.get("ipBlock")
                    if rule_peer == {} or (block and peer.subnet_of(ipaddress.ip_network(block["cidr"]))):
                        return True
                elif rule_peer == {} or _peer_matches(rule_peer, *peer, own):
                    return True
    return False


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {component: dict(pod_template(doc) or {})["metadata"]["labels"] for component, doc, _ in workloads(docs)}


def _own_namespace(docs: list[dict[str, Any]]) -> dict[str, str]:
    (namespace,) = of_kind(docs, "Namespace").values()
    return {"kubernetes.io/metadata.name": namespace["metadata"]["name"], **namespace["metadata"].get("labels", {})}


def test_everything_not_allowed_is_denied(docs: list[dict[str, Any]]) -> None:
    policies = of_kind(docs, "NetworkPolicy")
    deny = [
        p
        for p in policies.values()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "a default-deny policy for ingress and egress"


def test_network_policies_allow_exactly_the_designed_calls(docs: list[dict[str, Any]]) -> None:
    policies = list(of_kind(docs, "NetworkPolicy").values())
    own = _own_namespace(docs)
    pods = _pods(docs)
    endpoints = {name: (own, labels) for name, labels in pods.items()}
    endpoints.update(OUTSIDE_PODS)
    allowed = set()
    for source, (source_namespace, source_labels) in endpoints.items():
        for target in PROCESSES:
            port = PORTS[target]
            sends = source not in pods or _allowed(policies, "egress", pods[source], endpoints[target], port, own)
            accepts = _allowed(policies, "ingress", pods[target], (source_namespace, source_labels), port, own)
            if sends and accepts and source != target:
                allowed.add((source, target))
    assert sorted(allowed - EXPECTED_EDGES) == [], "calls allowed that the design does not make"
    assert sorted(EXPECTED_EDGES - allowed) == [], "calls the design makes that the policies block"
    # Nothing else inside the namespace is reachable on any port, from anywhere.
    for target, labels in pods.items():
        for port in (22, 5432, 8080, *PORTS.values()):
            for source in endpoints:
                if (source, target) not in EXPECTED_EDGES and source != target:
                    source_ns, source_labels = endpoints[source]
                    assert not _allowed(policies, "ingress", labels, (source_ns, source_labels), port, own), (
                        source,
                        target,
                        port,
                    )
    # And every pod may resolve names.
    for name, labels in pods.items():
        for protocol in ("UDP", "TCP"):
            assert _allowed(policies, "egress", labels, OUTSIDE_PODS["kube-dns"], 53, own, protocol), name


def test_egress_leaves_the_cluster_only_for_postgres_redis_and_the_webhook(
    docs: list[dict[str, Any]], overlay: str
) -> None:
    policies = list(of_kind(docs, "NetworkPolicy").values())
    own = _own_namespace(docs)
    pods = _pods(docs)
    blocks = {
        ipaddress.ip_network(peer["ipBlock"]["cidr"])
        for p in policies
        for rule in p["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    }
    for block in blocks:
        assert block.prefixlen > 0, "no egress to the whole internet"
        assert not block.overlaps(PLACEHOLDER_NETWORK), "the overlay must replace the base's placeholder ranges"
    reachable = set()
    for name, labels in pods.items():
        for block in blocks:
            for what, port in EXTERNAL_PORTS.items():
                if _allowed(policies, "egress", labels, block, port, own):
                    reachable.add((what, name))
        for port in (22, 80, 8080):
            assert not any(_allowed(policies, "egress", labels, block, port, own) for block in blocks), name
    assert reachable == EXPECTED_EXTERNAL[overlay]


@pytest.mark.parametrize("process", PROCESSES)
def test_each_deployment_s_process_starts_from_exactly_its_environment(
    rendered: dict[str, list[dict[str, Any]]], process: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prod: the process's own factory (start-up checks included, production refusal armed) builds from
    exactly the environment and secrets the Deployment gives its container (DATA_DIR, an emptyDir, moved
    to a temporary directory)."""
    from tests.deploy.test_compose import build_app

    docs = rendered["prod"]
    monkeypatch.chdir(tmp_path)  # no .env file
    (container,) = of_kind(docs, "Deployment")[f"comptoir-{process}"]["spec"]["template"]["spec"]["containers"]
    env = environment(docs, container, _stand_in_secrets(docs, "prod"))
    assert env["ENVIRONMENT"] == "production"
    env["DATA_DIR"] = str(tmp_path / "data")
    if process == "audit":
        key = tmp_path / "checkpoint.key"  # the Secret volume of the checkpoint key
        from services.audit.signing import load_or_create_key

        load_or_create_key(key)
        env["AUDIT_CHECKPOINT_KEY_FILE"] = str(key)
    assert build_app(process, env) is not None


# ---------------------------------------------------------------- the deploy check


def test_the_deploy_check_sees_what_every_process_sees(docs: list[dict[str, Any]], overlay: str) -> None:
    """The CronJob comptoir-check runs `comptoir check --deploy` with every Deployment's environment (one
    pod's own lacks the others' secrets and fails the check), the migration Job's owner URL and the
    backup key; in prod it reads audit's checkpoint key from the same Secret as audit."""
    cronjob = of_kind(docs, "CronJob")["comptoir-check"]
    assert cronjob["spec"]["suspend"] is True, "it runs when the operator asks (README), not by surprise"
    spec = pod_spec(cronjob) or {}
    (check,) = containers_of(spec)
    assert check["command"] == ["comptoir", "check", "--deploy"]
    seen = environment(docs, check)
    every: dict[str, str] = {}
    for process in PROCESSES:
        (container,) = of_kind(docs, "Deployment")[f"comptoir-{process}"]["spec"]["template"]["spec"]["containers"]
        every.update(environment(docs, container))
    extra = {"POSTGRES_ADMIN_PASSWORD", "DATABASE_URL", "BACKUP_ENCRYPTION_KEY"}
    assert {name: value for name, value in seen.items() if name not in extra} == every
    (migrate,) = of_kind(docs, "Job")["comptoir-migrate"]["spec"]["template"]["spec"]["containers"]
    assert seen["DATABASE_URL"] == environment(docs, migrate)["DATABASE_URL"]
    assert secret_refs(check)["BACKUP_ENCRYPTION_KEY"] == {
        "name": "comptoir-backup",
        "key": "BACKUP_ENCRYPTION_KEY",
        "optional": True,
    }
    key_file = seen.get("AUDIT_CHECKPOINT_KEY_FILE")
    assert bool(key_file) == (overlay == "prod")
    if key_file:
        audit = of_kind(docs, "Deployment")["comptoir-audit"]["spec"]["template"]["spec"]

        def key_secret(pod: dict[str, Any]) -> str:
            (container,) = pod["containers"]
            (mount,) = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
            assert mount.get("readOnly") is True
            return str({v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]["secretName"])

        assert key_secret(spec) == key_secret(audit)


@pytest.mark.e2e
def test_the_deploy_check_passes_after_the_migration_job_on_a_tls_database(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """prod, against a real PostgreSQL speaking TLS (verify-full): `comptoir migrate` from exactly the
    migration Job's environment, then `comptoir check --deploy` from exactly the CronJob's: every check
    passes, the database ones included. Mapped, and only that: the database's host, port and CA file to
    this test's server, DATA_DIR (an emptyDir) and the checkpoint key's Secret volume to temporary paths."""
    from services.audit.signing import load_or_create_key
    from tests.support.tls_postgres import tls_postgres

    docs = copy.deepcopy(rendered["prod"])
    stand_in = _stand_in_secrets(docs, "prod")
    values: dict[tuple[str, str], str | None] = {}

    def supply(name: str, key: str) -> str | None:
        if (name, key) not in values:
            values[name, key] = stand_in(name, key)
        return values[name, key]

    config = of_kind(docs, "ConfigMap")["comptoir-config"]["data"]
    admin_password = supply("comptoir-database-admin", "POSTGRES_ADMIN_PASSWORD")
    assert admin_password
    key = tmp_path / "checkpoint.key"
    load_or_create_key(key)
    comptoir = str(Path(sys.executable).with_name("comptoir"))

    def run(container: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        env = {name: str(value) for name, value in environment(docs, container, supply).items()}
        env["DATA_DIR"] = str(tmp_path / "data")
        if "AUDIT_CHECKPOINT_KEY_FILE" in env:
            env["AUDIT_CHECKPOINT_KEY_FILE"] = str(key)
        env["PATH"] = os.environ["PATH"]
        return subprocess.run(
            [comptoir, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
        )

    def failing(done: subprocess.CompletedProcess[str]) -> list[str]:
        return [item["id"] for item in json.loads(done.stdout)["checks"] if item["status"] == "FAIL"]

    with tls_postgres(config["POSTGRES_ADMIN_USER"], admin_password, config["POSTGRES_DB"]) as server:
        config |= {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(server.port), "PGSSLROOTCERT": str(server.ca)}
        (migrate,) = of_kind(docs, "Job")["comptoir-migrate"]["spec"]["template"]["spec"]["containers"]
        migrated = run(migrate, *migrate["command"][1:])
        assert migrated.returncode == 0, migrated.stderr
        (check,) = containers_of(pod_spec(of_kind(docs, "CronJob")["comptoir-check"]) or {})
        done = run(check, *check["command"][1:], "--json")
        checks = {item["id"]: item["status"] for item in json.loads(done.stdout)["checks"]}
        must_pass = ("CMP-D001", "CMP-D003", "CMP-D004", "CMP-D007", "CMP-W024")
        assert {name: checks[name] for name in must_pass} == dict.fromkeys(must_pass, "PASS")
        assert failing(done) == [], done.stdout
        assert done.returncode == 0, done.stderr
        # The same command in one process's pod: the other processes' secrets are missing, and it fails.
        (auth,) = of_kind(docs, "Deployment")["comptoir-auth"]["spec"]["template"]["spec"]["containers"]
        alone = run(auth, *check["command"][1:], "--json")
        assert alone.returncode == 1
        assert "CMP-W002" in failing(alone)
