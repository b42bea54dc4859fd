"""deploy/k8s/: every object valid against the Kubernetes schemas, and the settings it gives the service usable.

What this verifies: the manifests against the OpenAPI schemas of two Kubernetes versions (kubernetes-validate,
which bundles them: checked here with sockets refused), strictly (an unknown or misspelt field fails); that the
kustomizations name every file; that every `PTX_*` variable is a real setting and the service would accept the
values; the stop grace against the drain; probes, Secrets, volumes and Services wired to each other; each
listener its own name and claim, triaging through the triage Service with a token it may POST with; the GPU
variant equal to the CPU one but for its GPU parts. What it does not: nothing here is applied to a cluster
(no API server, admission webhooks, scheduler, GPU or image pull); docs/deploy.md says so too.
"""

from __future__ import annotations

import copy
import socket
import urllib.parse
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from service.http.auth import Role, read_token_entries
from service.pacs.delivery.destinations import parse_destinations
from service.settings import Settings, load_settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
VARIANTS = ("cpu", "gpu")
#: The oldest Kubernetes still commonly run, and the newest the validator bundles.
VERSIONS = ("1.29", latest_version())
WORKLOADS = ("Deployment", "StatefulSet")
#: What the GPU variant may change in the triage Deployment's pod template (container fields / pod fields).
GPU_ONLY_ENV = {"PTX_BACKEND", "PTX_TRT_CACHE_DIR"}
#: What a Secret's key stands for in the tests (the real values live only in the cluster).
SECRET_STAND_INS = {("ptx-database", "url"): "postgresql://ptx@postgres.db.svc:5432/ptx",
                    ("ptx-triage-token", "token"): "a-stand-in-listener-token"}
POD_NAME = "ptx-pod-0"  # what the downward API's metadata.name gives when a test names no pod


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[dict]:
    """The objects `kubectl apply -k folder` would create: its resources, folders recursively (no patches
    are used, so this is all kustomize does with these files but the common labels)."""
    objects = []
    for entry in _documents(folder / "kustomization.yaml")[0]["resources"]:
        target = (folder / entry).resolve()
        objects += render(target) if target.is_dir() else _documents(target)
    return objects


def _workload(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _environ(container: dict, pod_name: str = POD_NAME) -> dict[str, str]:
    """The container's environment as the service would see it in the pod `pod_name`, a Secret's value stood in
    for by a placeholder; any other source than a Secret or the pod's name fails the test."""
    environ = {}
    for variable in container["env"]:
        source = variable.get("valueFrom")
        if source is None:
            environ[variable["name"]] = variable["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            environ[variable["name"]] = SECRET_STAND_INS[(ref["name"], ref["key"])]
        else:
            assert source == {"fieldRef": {"fieldPath": "metadata.name"}}, variable
            environ[variable["name"]] = pod_name
    return environ


def _mount_of(workload: dict, path: str) -> tuple[dict, str]:
    """The volume mount holding `path` and the name of the volume (or claim template) behind it."""
    (mount,) = [m for m in _container(workload)["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    return mount, mount["name"]


def test_every_object_validates_against_the_kubernetes_schemas_offline(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network refused by the test: the validator must work offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    objects = [(path, doc) for path in files for doc in _documents(path)]
    assert {doc["kind"] for _, doc in objects} >= {"Deployment", "StatefulSet", "Service", "Secret",
                                                   "PodDisruptionBudget"}
    for version in VERSIONS:
        for path, doc in objects:
            assert kubernetes_validate.validate(doc, version, strict=True), (path, doc["kind"])


@pytest.mark.parametrize("mistake, where", [
    (lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=45), "terminationGracePeriod"),
    (lambda d: d["spec"].update(replicas="3"), "replicas"),
    (lambda d: _container(d)["readinessProbe"]["httpGet"].update(port=None), "port"),
])
def test_the_validator_catches_a_mistake(mistake, where) -> None:
    deployment = copy.deepcopy(_workload(render(K8S / "cpu"), "Deployment"))
    mistake(deployment)
    with pytest.raises(kubernetes_validate.ValidationError, match=where):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_the_kustomizations_name_every_manifest_once() -> None:
    named = [(folder / entry).resolve() for folder in {p.parent for p in K8S.rglob("kustomization.yaml")}
             for entry in _documents(folder / "kustomization.yaml")[0]["resources"]]
    assert all(path.exists() for path in named), named
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - set(named) == {(K8S / "secrets.example.yaml").resolve()}, "a manifest no variant applies"
    assert len([p for p in named if p.is_file()]) == len({p for p in named if p.is_file()})
    for variant in VARIANTS:
        objects = render(K8S / variant)
        assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects), variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_workload_gets_settings_the_service_accepts(variant) -> None:
    objects = render(K8S / variant)
    for kind in WORKLOADS:
        workload = _workload(objects, kind)
        container, pod = _container(workload), workload["spec"]["template"]["spec"]
        environ = _environ(container)
        unknown = {name for name in environ if name.removeprefix("PTX_").lower() not in Settings.model_fields}
        assert not unknown, f"{kind}: no such setting {unknown}"
        settings = load_settings(environ=environ)
        assert pod["terminationGracePeriodSeconds"] >= settings.drain_timeout_s + 15, kind
        parse_destinations(settings.destinations)
        # The database URL and the tokens come from Secrets, never from a literal in the manifest.
        (database,) = [v for v in container["env"] if v["name"] == "PTX_DATABASE_URL"]
        assert database["valueFrom"]["secretKeyRef"] == {"name": "ptx-database", "key": "url"}
        mount, volume = _mount_of(workload, str(settings.api_token_file))
        assert mount["readOnly"]
        (tokens,) = [v for v in pod["volumes"] if v["name"] == volume]
        assert tokens["secret"]["secretName"] == "ptx-api-tokens"
        assert str(settings.api_token_file) == f"{mount['mountPath']}/tokens"
        _mount_of(workload, str(settings.data_dir))
        # Probes on BentoML's port: ready only once the models are warm (and not while draining).
        (http,) = [p for p in container["ports"] if p["name"] == "http"]
        assert http["containerPort"] == 3000
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert container["resources"]["limits"]["cpu"] == str(settings.intra_op_threads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_listener_has_its_own_name_and_claim_and_the_triage_replicas_none(variant) -> None:
    objects = render(K8S / variant)
    listener, triage = _workload(objects, "StatefulSet"), _workload(objects, "Deployment")
    replicas = listener["spec"]["replicas"]
    assert replicas >= 2, "several listeners (issue 17 §1)"
    (name,) = [v for v in _container(listener)["env"] if v["name"] == "PTX_LISTENER_NAME"]
    assert name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, "the name follows the pod"
    pods = [f"{listener['metadata']['name']}-{ordinal}" for ordinal in range(replicas)]  # a StatefulSet's names
    names = {load_settings(environ=_environ(_container(listener), pod)).listener_name for pod in pods}
    assert names == set(pods), "each pod name is a valid PTX_LISTENER_NAME, and each listener's own"
    settings = load_settings(environ=_environ(_container(listener), pods[0]))
    assert settings.edge_workers == 1 and settings.dicom_port is not None
    assert {"name": "dicom", "containerPort": settings.dicom_port} in _container(listener)["ports"]
    # The spool on a claim made per pod (data-ptx-pacs-0, ...), kept when the StatefulSet is scaled down.
    _, volume = _mount_of(listener, str(settings.data_dir))
    assert volume in {claim["metadata"]["name"] for claim in listener["spec"]["volumeClaimTemplates"]}
    assert volume not in {v["name"] for v in listener["spec"]["template"]["spec"]["volumes"]}
    assert listener["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    triage_env = _environ(_container(triage))
    assert not {"PTX_DICOM_PORT", "PTX_LISTENER_NAME", "PTX_TRIAGE_URL"} & set(triage_env)
    assert "volumeClaimTemplates" not in triage["spec"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_listeners_triage_through_the_triage_service_and_every_replica_reads_the_results(variant) -> None:
    objects = render(K8S / variant)
    listener, triage = _workload(objects, "StatefulSet"), _workload(objects, "Deployment")
    settings = load_settings(environ=_environ(_container(listener)))
    url = urllib.parse.urlsplit(settings.triage_url or "")
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert url.scheme == "http" and url.hostname in services, f"PTX_TRIAGE_URL names no Service: {url.geturl()}"
    service = services[url.hostname]
    assert service["spec"]["selector"].items() <= triage["spec"]["template"]["metadata"]["labels"].items()
    assert (url.port or 80) in {port["port"] for port in service["spec"]["ports"]}
    (token,) = [v for v in _container(listener)["env"] if v["name"] == "PTX_TRIAGE_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ptx-triage-token", "key": "token"}
    for workload in (listener, triage):  # a listener's SEG/SR/SC: sent by any listener, served by any replica
        assert load_settings(environ=_environ(_container(workload))).results_in_database is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_service_reaches_a_workload_port(variant) -> None:
    objects = render(K8S / variant)
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        (target,) = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        names = {p["name"] for p in _container(target)["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names, service["metadata"]["name"]
    listener = _workload(objects, "StatefulSet")
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == listener["spec"]["serviceName"]
               and o["spec"].get("clusterIP") == "None" for o in objects), "the StatefulSet's headless Service"
    budgets = [o["spec"]["selector"] for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert sorted(budgets, key=str) == sorted((w["spec"]["selector"] for w in workloads), key=str), \
        "one disruption budget per workload: a node drain takes its pods one at a time"


def test_the_gpu_variant_is_the_cpu_one_plus_its_gpu_parts() -> None:
    cpu, gpu = (copy.deepcopy(_workload(render(K8S / v), "Deployment")) for v in VARIANTS)
    pod, container = gpu["spec"]["template"]["spec"], _container(gpu)
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert {t["key"] for t in pod.pop("tolerations")} == {"nvidia.com/gpu"}
    pod.pop("nodeSelector")
    trt = load_settings(environ=_environ(container)).trt_cache_dir
    _, cache = _mount_of(gpu, str(trt))
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != cache]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != cache]
    container["env"] = [v for v in container["env"] if v["name"] not in GPU_ONLY_ENV]
    for workload in (cpu, gpu):
        _container(workload).pop("image")
        _container(workload).pop("resources")
        workload["spec"].pop("replicas")
    assert gpu == cpu


def test_the_example_secrets_are_the_ones_the_workloads_read(tmp_path) -> None:
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in _documents(K8S / "secrets.example.yaml")}
    assert set(secrets) == {name for name, _ in SECRET_STAND_INS} | {"ptx-api-tokens"}
    assert all(key in secrets[name] for name, key in SECRET_STAND_INS)
    tokens = tmp_path / "tokens"
    tokens.write_text(secrets["ptx-api-tokens"]["tokens"])
    entries = read_token_entries(tokens)
    assert [role.value for _, role in entries] == ["reviewer", "read-only", "reviewer"]
    # The listeners' token is a line of the replicas' token file, with a role that may POST /v1/triage.
    assert (secrets["ptx-triage-token"]["token"], Role.REVIEWER) in entries
