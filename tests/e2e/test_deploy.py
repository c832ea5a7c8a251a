"""deploy/ must say exactly what the services accept: commands, flags, env vars, ports, paths."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator_svc.config import OrchestratorConfig
from status_svc.config import StatusConfig
from stepstream_common.config import ServiceConfig, options
from tests.helpers import REPO, ServiceProcess

DEPLOY = REPO / "deploy"
CONFIGS: dict[str, type[ServiceConfig]] = {"orchestrator_svc": OrchestratorConfig, "status_svc": StatusConfig}


def accepted_env(module: str) -> frozenset[str]:
    """The environment variables a service reads: the twins of its config's fields."""
    return frozenset(option.env for option in options(CONFIGS[module]))


def parse(module: str, args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as patch:
        for name in accepted_env(module):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        return CONFIGS[module].from_args(args)


def module_of(command: list[str]) -> tuple[str, list[str]]:
    assert command[:2] == ["python", "-m"], command
    assert command[2] in CONFIGS, command
    return command[2], command[3:]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def k8s_documents() -> list[dict[str, Any]]:
    return [
        doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def k8s_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_has_the_agreed_shape() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_documents()}
    assert ("Deployment", "stepstream-orchestrator") in kinds
    assert ("Service", "stepstream-orchestrator") in kinds
    assert ("StatefulSet", "stepstream-status") in kinds
    assert ("Service", "stepstream-status") in kinds
    status = next(doc for doc in k8s_documents() if doc["kind"] == "StatefulSet")
    assert status["spec"]["volumeClaimTemplates"], "the status service's SQLite file needs a volume"


def test_k8s_containers_match_what_the_services_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in k8s_documents() if doc["kind"] == "ConfigMap"}
    services = {doc["metadata"]["name"]: doc for doc in k8s_documents() if doc["kind"] == "Service"}
    seen = set()
    for workload, container in k8s_containers():
        module, args = module_of(container["command"] + container.get("args", []))
        seen.add(module)
        env = {item["name"]: item["value"] for item in container.get("env", [])}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        assert set(env) <= accepted_env(module), set(env) - accepted_env(module)
        config = parse(module, args, env, monkeypatch)

        host, port = config.listen.rsplit(":", 1)
        assert host == "0.0.0.0", "in a pod the service must listen on all interfaces"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": int(port)}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == int(port), probe

        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert str(config.data_dir) == mounts["data"]

        name = workload["metadata"]["name"]
        service = services[name]
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
        assert service["spec"]["ports"][0]["port"] == int(port)
        if module == "status_svc":
            orchestrator = services["stepstream-orchestrator"]["spec"]["ports"][0]["port"]
            assert config.orchestrators == [f"stepstream-orchestrator:{orchestrator}"]
    assert seen == set(CONFIGS)


def test_compose_matches_what_the_services_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        module, args = module_of(service["command"])
        env = {key: str(value) for key, value in service.get("environment", {}).items()}
        assert set(env) <= accepted_env(module), set(env) - accepted_env(module)
        config = parse(module, args, env, monkeypatch)
        port = port_of(config.listen)
        assert any(mapping.endswith(f":{port}") for mapping in service["ports"])
        assert any(volume.endswith(f":{config.data_dir}") for volume in service["volumes"])
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        if module == "status_svc":
            orchestrator_port = port_of(parse("orchestrator_svc", module_of(
                compose["services"]["orchestrator"]["command"])[1], {}, monkeypatch).listen)
            assert config.orchestrators == [f"orchestrator:{orchestrator_port}"], name


def test_dockerfile_copies_every_package_and_sets_only_real_env() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "packages"
    ]
    for package in packages:
        top = Path(package).parts[0]
        assert re.search(rf"^COPY {top} ", dockerfile, re.MULTILINE), f"Dockerfile does not copy {top}"
    env = set(re.findall(r"(STEPSTREAM_[A-Z_]+)=", dockerfile))
    assert env <= accepted_env("orchestrator_svc") | accepted_env("status_svc")


def test_the_healthcheck_module_reports_serving(orchestrator_address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stepstream_common.healthcheck", orchestrator_address],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    dead = subprocess.run(
        [sys.executable, "-m", "stepstream_common.healthcheck", "127.0.0.1:1"], capture_output=True, text=True,
    )
    assert dead.returncode == 1
    assert "UNAVAILABLE" in dead.stderr


@pytest.fixture
def orchestrator_address(tmp_path: Path) -> Iterator[str]:
    process = ServiceProcess("orchestrator_svc", ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)])
    try:
        yield process.start()
    finally:
        process.stop()
