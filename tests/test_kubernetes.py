"""deploy/kubernetes: valid manifests that agree with each other, the image and the config.

No cluster is needed: every manifest is validated offline against the Kubernetes JSON schemas
kubernetes-validate ships, and the example config in the Secret is loaded by the bridge's own
load_settings with the StatefulSet's environment applied, as a pod would load it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Settings, load_settings
from bridge.errors import ConfigError
from bridge.service import STOP_TIMEOUT
from bridge.web import HEALTHY_WITHIN

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"

#: The oldest Kubernetes minor the manifests are checked against (the PDB's
#: unhealthyPodEvictionPolicy is beta and on by default from 1.27, GA in 1.31), and the
#: newest kubernetes-validate ships.
OLDEST = "1.30.0"

#: What marks an example value in the Secret's config that must be replaced.
PLACEHOLDER = "REPLACE-ME"

#: The pod the config is loaded "in": the middle one of three.
POD = "smartmac-bridge-1"


def _load(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    assert docs, f"{path.name}: no document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path.name}: a document is not a mapping"
    return docs


MANIFESTS = {path.name: _load(path) for path in sorted(DEPLOY.glob("*.y*ml")) if path.name != KUSTOMIZATION}
KUSTOMIZE = _load(DEPLOY / KUSTOMIZATION)[0]
RESOURCES = [doc for docs in MANIFESTS.values() for doc in docs]


def _only(kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in RESOURCES if doc["kind"] == kind]
    return doc


STS = _only("StatefulSet")
SERVICE = _only("Service")
PDB = _only("PodDisruptionBudget")
SECRET = _only("Secret")
POD_SPEC: dict[str, Any] = STS["spec"]["template"]["spec"]
(CONTAINER,) = POD_SPEC["containers"]
ENV: dict[str, str] = {item["name"]: item["value"] for item in CONTAINER["env"]}
(HTTP_PORT,) = [port for port in CONTAINER["ports"] if port["name"] == "http"]


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    assert KUSTOMIZE["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert KUSTOMIZE["kind"] == "Kustomization"
    resources = KUSTOMIZE["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(MANIFESTS)
    # The user's current namespace (README "Kubernetes" says so); commonLabels is deprecated.
    assert "namespace" not in KUSTOMIZE and "commonLabels" not in KUSTOMIZE
    # Labels added here must not reach the StatefulSet's selector, which cannot change.
    assert all(not labels.get("includeSelectors", False) for labels in KUSTOMIZE.get("labels", []))
    # The images entry is the one the StatefulSet names.
    assert [image["name"] for image in KUSTOMIZE["images"]] == [CONTAINER["image"]]


@pytest.mark.parametrize("version", [OLDEST, "latest"])
@pytest.mark.parametrize(
    "doc", RESOURCES, ids=[f"{doc['kind']}-{doc['metadata']['name']}" for doc in RESOURCES]
)
def test_manifest_is_valid_kubernetes(doc: dict[str, Any], version: str) -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the test extra) is not installed"
    )
    wanted = validator.latest_version() if version == "latest" else version
    # strict: a key the schema does not know is an error, not silently dropped by the API.
    validator.validate(doc, wanted, strict=True)


def test_rendered_by_kustomize_as_written() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (kubectl kustomize renders offline)")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    rendered = [doc for doc in yaml.safe_load_all(out) if doc is not None]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in RESOURCES
    )
    (sts,) = [d for d in rendered if d["kind"] == "StatefulSet"]
    (image,) = KUSTOMIZE["images"]
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{image['newName']}:{image['newTag']}"
    )
    assert sts["spec"]["selector"] == STS["spec"]["selector"]


def test_every_selector_picks_the_statefulsets_pods() -> None:
    selector = STS["spec"]["selector"]["matchLabels"]
    assert set(STS["spec"]["selector"]) == {"matchLabels"}
    pod_labels = STS["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert SERVICE["spec"]["selector"] == selector
    assert PDB["spec"]["selector"] == {"matchLabels": selector}
    (spread,) = POD_SPEC["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": selector}
    # The governing Service gives the pods their DNS names (smartmac-bridge-1.smartmac-bridge).
    assert STS["spec"]["serviceName"] == SERVICE["metadata"]["name"]


def test_service_is_headless_on_the_containers_http_port() -> None:
    spec = SERVICE["spec"]
    assert spec["clusterIP"] == "None"
    (port,) = spec["ports"]
    assert port["name"] == "http" and port["port"] == HTTP_PORT["containerPort"] == 8099
    assert port["targetPort"] in (HTTP_PORT["name"], HTTP_PORT["containerPort"])
    # The port the config makes the bridge serve on (the environment wins over the file).
    assert ENV["SMARTMAC_HTTP__PORT"] == str(HTTP_PORT["containerPort"])


def test_probes_ask_the_bridge_on_its_http_port() -> None:
    ready, live = CONTAINER["readinessProbe"], CONTAINER["livenessProbe"]
    assert ready["httpGet"] == {"path": "/readyz", "port": HTTP_PORT["name"]}
    assert live["httpGet"] == {"path": "/healthz", "port": HTTP_PORT["name"]}
    # /healthz itself allows HEALTHY_WITHIN s without a loop turn, so asking more often finds
    # a stuck loop no sooner; a restart needs more than one miss.
    assert live["failureThreshold"] >= 2 and live["timeoutSeconds"] < live["periodSeconds"]
    assert live["periodSeconds"] >= HEALTHY_WITHIN
    # A stop says offline within STOP_TIMEOUT; Kubernetes kills the pod after the grace period.
    assert POD_SPEC["terminationGracePeriodSeconds"] > STOP_TIMEOUT


def test_one_shard_per_replica_with_the_index_from_the_pod_name() -> None:
    spec = STS["spec"]
    assert spec["replicas"] == 3
    assert ENV["SMARTMAC_SHARD__COUNT"] == str(spec["replicas"])
    assert spec["podManagementPolicy"] == "Parallel"
    # The index is the host name's trailing -<n>: set here, it would be one for all pods.
    assert "SMARTMAC_SHARD__INDEX" not in ENV
    assert "hostname" not in POD_SPEC and "subdomain" not in POD_SPEC
    assert all(name.startswith("SMARTMAC_") for name in ENV)


def test_config_comes_from_the_secret_mounted_read_only() -> None:
    (mount,) = CONTAINER["volumeMounts"]
    (volume,) = [v for v in POD_SPEC["volumes"] if v["name"] == mount["name"]]
    source = volume["secret"]
    assert source["secretName"] == SECRET["metadata"]["name"]
    (item,) = source["items"]
    assert ENV["SMARTMAC_CONFIG"] == f"{mount['mountPath']}/{item['path']}"
    assert item["key"] in SECRET["stringData"]
    assert mount["readOnly"] is True
    # A subPath mount would never see an edited Secret.
    assert "subPath" not in mount
    # Readable by the bridge's group (fsGroup), nobody else: it holds PINs.
    assert source["defaultMode"] == 0o440
    assert POD_SPEC["securityContext"]["fsGroup"] == _dockerfile_user()[1]


def _dockerfile_user() -> tuple[int, int]:
    users = [
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.startswith("USER ")
    ]
    uid, gid = users[-1].split(":")
    return int(uid), int(gid)


def test_non_root_read_only_and_without_privileges() -> None:
    uid, gid = _dockerfile_user()
    pod = POD_SPEC["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid and pod["runAsGroup"] == gid
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = CONTAINER["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid and ctx["runAsGroup"] == gid
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert POD_SPEC["automountServiceAccountToken"] is False
    assert POD_SPEC["enableServiceLinks"] is False
    # Requests and limits both set, the limit at or above the request.
    resources = CONTAINER["resources"]
    assert set(resources) == {"requests", "limits"}
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for kind in ("cpu", "memory"):
        assert _quantity(resources["requests"][kind]) <= _quantity(resources["limits"][kind])


_SUFFIXES = {"m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(text: str | int) -> float:
    """A Kubernetes quantity (100m, 1, 128Mi) as a number; only the suffixes used here."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None, f"not a quantity: {text!r}"
    return float(match[1]) * _SUFFIXES[match[2]]


def test_service_links_would_stop_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why enableServiceLinks is false: a Service named smartmac-web in the namespace would give
    # every pod SMARTMAC_WEB_SERVICE_HOST, and the bridge refuses unknown SMARTMAC_* variables.
    monkeypatch.setenv("SMARTMAC_WEB_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(ConfigError, match="SMARTMAC_WEB_SERVICE_HOST"):
        load_settings()


# --- the Secret's config, as the bridge loads it -------------------------------------------


def _secret_config() -> dict[str, Any]:
    config = yaml.safe_load(SECRET["stringData"]["config.yaml"])
    assert isinstance(config, dict)
    return config


def _load_in_pod(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """load_settings as the pod POD runs it: the StatefulSet's environment, its host name."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SMARTMAC_CONFIG", str(path))  # the mounted file, here
    # In a pod the host name is the pod name; the shard index is read from it.
    monkeypatch.setattr(socket, "gethostname", lambda: POD)
    return load_settings()


def test_secret_config_loads_with_the_statefulsets_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _load_in_pod(_secret_config(), monkeypatch, tmp_path)
    assert settings.http.port == HTTP_PORT["containerPort"]
    assert settings.http.host == "0.0.0.0"
    assert settings.http.password is not None  # what makes 0.0.0.0 allowed
    assert settings.mqtt.host is not None  # an external broker, not the embedded one
    assert len(settings.devices) == 2
    # Every secret in the example is a marked placeholder, never something that looks real.
    secrets = [settings.http.password, settings.mqtt.password, *(d.pin for d in settings.devices)]
    assert [s.get_secret_value() if s is not None else None for s in secrets] == [PLACEHOLDER] * 4


def test_secret_config_makes_each_pod_one_shard_of_a_broker_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _load_in_pod(_secret_config(), monkeypatch, tmp_path)
    assert settings.shard.count == STS["spec"]["replicas"]
    assert settings.shard.index == int(POD.rsplit("-", 1)[1])
    assert settings.shard.node == "bridge-1"
    assert settings.publish.output == "json"
    assert len(settings.mqtt.brokers) == 3
