"""deploy/ must say exactly what the services accept (commands, flags, env
vars, ports, paths), run them as safely as they can run (an unprivileged user
that owns the data directories, a read-only root filesystem, no capabilities,
TLS and tokens from Secrets, only the status service and clients let in), and
work: the settings each deploy file gives, with local files in place of its
secrets, start both services on all interfaces, pass their probes, and let
the status service follow the orchestrator. The PostgreSQL variants
(docker-compose.postgres.yml with Envoy in front of the replicas, the overlay
k8s-postgres/) are held to the same, each status replica run against a fresh
database of the test server, and to their own shape."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from stepstream.channel import ClientTLS, bearer_metadata, open_channel
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb
from stepstream.status.v1 import status_service_pb2_grpc as status_grpc
from stepstream_client.cli import build_parser

from orchestrator_svc.config import OrchestratorConfig
from status_svc.config import StatusConfig
from stepstream_common.config import ServiceConfig, options
from stepstream_common.exposure import Exposure, exposure_of
from stepstream_common.tokens import new_entry
from tests.helpers import REPO, ServiceProcess, eventually, free_port, job_definition, private_file
from tests.helpers.certs import Authority
from tests.helpers.postgres import fresh_database

DEPLOY = REPO / "deploy"
CONFIGS: dict[str, type[ServiceConfig]] = {"orchestrator_svc": OrchestratorConfig, "status_svc": StatusConfig}
# The label a pod carries to be let in as a client (deploy/k8s/network-policy.yaml).
CLIENT_LABEL = {"stepstream-client": "true"}
HEALTHCHECK = ["python", "-m", "stepstream_common.healthcheck"]


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


def file_settings(config: ServiceConfig) -> dict[str, Path]:
    """The files a config names (its Path settings that are set), data_dir aside."""
    found = {option.name: getattr(config, option.name) for option in options(type(config))}
    return {name: value for name, value in found.items() if isinstance(value, Path) and name != "data_dir"}


# --- the image ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """What deploy/Dockerfile says about the user and the directories it makes."""

    uid: int
    gid: int
    user: str  # its USER line
    data_dirs: dict[str, tuple[int, int, str]]  # each directory made -> owner uid, gid, mode
    env: dict[str, str]


def image() -> Image:
    text = (DEPLOY / "Dockerfile").read_text()
    logical = text.replace("\\\n", " ")
    user_match = re.search(r"useradd --uid (\d+) --gid (\d+)", logical)
    group_match = re.search(r"groupadd --gid (\d+)", logical)
    made = re.search(r"install -d -o (\d+) -g (\d+) -m (\d+) ((?:/\S+ ?)+)", logical)
    [user] = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user_match and group_match and made, "the Dockerfile makes its user, group and data directories"
    uid, gid = int(user_match[1]), int(user_match[2])
    assert int(group_match[1]) == gid
    owner = (int(made[1]), int(made[2]), made[3])
    return Image(uid=uid, gid=gid, user=user, data_dirs=dict.fromkeys(made[4].split(), owner),
                 env=dict(re.findall(r"(STEPSTREAM_[A-Z_]+)=(\S+)", text)))


def test_the_image_runs_as_an_unprivileged_user_who_owns_the_data_directories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = image()
    assert made.uid != 0 and made.gid != 0
    assert made.user == f"{made.uid}:{made.gid}", "USER is numeric, so Kubernetes can check runAsNonRoot"
    assert made.data_dirs, "the image makes the directories volumes are mounted on"
    for path, owner in made.data_dirs.items():
        assert owner == (made.uid, made.gid, "0700"), path
    for module in CONFIGS:
        env = {name: value for name, value in made.env.items() if name in accepted_env(module)}
        config = parse(module, [], env, monkeypatch)
        assert str(config.data_dir) in made.data_dirs, module
        # Its listen address is every interface: with no TLS and tokens given, it must refuse.
        assert exposure_of(config).refusal, module


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


def test_every_variable_a_deploy_file_names_is_a_real_setting() -> None:
    """Anywhere in deploy/, comments included: a service's setting, or the CLI's
    (what the comments tell a user to set to call the services)."""
    services = accepted_env("orchestrator_svc") | accepted_env("status_svc")
    cli = set(re.findall(r"STEPSTREAM_[A-Z_]+", build_parser().format_help()))
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        named = set(re.findall(r"STEPSTREAM_[A-Z_]+", path.read_text()))
        assert named <= services | cli, (path.name, named - services - cli)


# --- Kubernetes ---------------------------------------------------------------------------------------------


# deploy/k8s (SQLite) and its overlay deploy/k8s-postgres (replicas on PostgreSQL).
K8S_VARIANTS = ("k8s", "k8s-postgres")
# What the tests use in place of a value a manifest takes from a Secret (Secret, key).
SECRET_VALUES = {("stepstream-status-store", "url"): "postgresql://stepstream@postgres.example:5432/stepstream"}


def kustomized(root: Path) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize root` makes, for what our kustomizations
    use: resources (files, or directories with a kustomization of their own) and
    patches that delete a document."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, "teach kustomized() the rest"
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = root / resource
        documents += kustomized(path) if path.is_dir() else [
            doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        deleted = yaml.safe_load(patch["patch"])
        assert deleted.pop("$patch") == "delete", "only deleting patches are understood here"
        key = (deleted["kind"], deleted["metadata"]["name"])
        assert key in {(doc["kind"], doc["metadata"]["name"]) for doc in documents}, key
        documents = [doc for doc in documents if (doc["kind"], doc["metadata"]["name"]) != key]
    return documents


def k8s_documents(variant: str = "k8s") -> list[dict[str, Any]]:
    return kustomized(DEPLOY / variant)


def k8s_workloads(variant: str = "k8s") -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents(variant) if doc["kind"] in ("Deployment", "StatefulSet")]


def k8s_containers(variant: str = "k8s") -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in k8s_workloads(variant):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def k8s_env(container: dict[str, Any], variant: str = "k8s") -> dict[str, str]:
    """The container's environment; a value from a Secret is its stand-in in SECRET_VALUES."""
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in k8s_documents(variant)
                   if doc["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SECRET_VALUES[(ref["name"], ref["key"])]
    return env


def secret_items(volume: dict[str, Any]) -> list[str]:
    """The file names a Secret (or a projection of Secrets) volume holds; [] for any other volume."""
    if "secret" in volume:
        return [item["path"] for item in volume["secret"]["items"]]
    if "projected" in volume:
        return [item["path"] for source in volume["projected"]["sources"] for item in source["secret"]["items"]]
    return []


def provided_files(workload: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """The files `container` finds from Secrets: in the Secret volumes it mounts,
    and the copies the pod's init containers make (install -m 0600 -t DIR FILE...)
    into a volume it mounts too."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    files = {str(PurePosixPath(mounts[name]) / item)
             for name, volume in volumes.items() if name in mounts for item in secret_items(volume)}
    for init in spec.get("initContainers", []) if container in spec["containers"] else []:
        command = init["command"]
        assert command[:5] == ["install", "-m", "0600", "-t", command[4]], command
        target, sources = command[4], command[5:]
        assert set(sources) <= provided_files(workload, init), sources
        [volume] = [mount["name"] for mount in init["volumeMounts"] if mount["mountPath"] == target]
        if volume in mounts:
            files |= {str(PurePosixPath(mounts[volume]) / PurePosixPath(source).name) for source in sources}
    return files


def k8s_settings(monkeypatch: pytest.MonkeyPatch, variant: str = "k8s") -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each service's config as its manifests set it, and its container."""
    found = {}
    for _, container in k8s_containers(variant):
        module, args = module_of(container["command"] + container.get("args", []))
        found[module] = (parse(module, args, k8s_env(container, variant), monkeypatch), container)
    return found


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_kustomization_lists_every_manifest(variant: str) -> None:
    listed = set(yaml.safe_load((DEPLOY / variant / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / variant).glob("*.yaml")} - {"kustomization.yaml"}
    assert {name for name in listed if not (DEPLOY / variant / name).is_dir()} == present


def test_k8s_has_the_agreed_shape() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in k8s_documents()}
    assert ("Deployment", "stepstream-orchestrator") in kinds
    assert ("Service", "stepstream-orchestrator") in kinds
    assert ("StatefulSet", "stepstream-status") in kinds
    assert ("Service", "stepstream-status") in kinds
    assert ("NetworkPolicy", "stepstream-orchestrator") in kinds
    assert ("NetworkPolicy", "stepstream-status") in kinds
    status = next(doc for doc in k8s_documents() if doc["kind"] == "StatefulSet")
    assert status["spec"]["volumeClaimTemplates"], "the status service's SQLite file needs a volume"


def test_k8s_postgres_runs_status_replicas_on_the_database_from_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay: the base but for the status service, now a Deployment of 2+
    replicas whose store URL and password come from a Secret, ready only while
    grpc.health says SERVING (so a replica that lost its database leaves the
    Service), alive as long as it accepts connections."""
    base = {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents()}
    overlay = {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents("k8s-postgres")}
    assert set(overlay) == set(base) - {("StatefulSet", "stepstream-status")} | {("Deployment", "stepstream-status")}
    assert all(overlay[key] == doc for key, doc in base.items() if key in overlay), "the rest is the base's"
    status = overlay[("Deployment", "stepstream-status")]
    assert status["spec"]["replicas"] >= 2
    assert status["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "a rollout keeps replicas serving"
    config, container = k8s_settings(monkeypatch, "k8s-postgres")["status_svc"]
    assert config.store == SECRET_VALUES[("stepstream-status-store", "url")], "the store URL comes from the Secret"
    assert str(config.store_password_file) in provided_files(status, container)
    assert container["readinessProbe"]["exec"]["command"][:3] == HEALTHCHECK
    assert container["readinessProbe"]["failureThreshold"] == 1
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    # The pod is the base's but for what the overlay's header says.
    pod, base_pod = status["spec"]["template"], base[("StatefulSet", "stepstream-status")]["spec"]["template"]
    differs = {"initContainers", "containers", "volumes", "affinity"}
    assert {k: v for k, v in pod["spec"].items() if k not in differs} == \
        {k: v for k, v in base_pod["spec"].items() if k not in differs}
    [base_container] = base_pod["spec"]["containers"]
    same = {"image", "command", "envFrom", "ports", "securityContext", "startupProbe", "resources"}
    assert {k: container[k] for k in same} == {k: base_container[k] for k in same}


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_k8s_containers_match_what_the_services_accept(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = {doc["metadata"]["name"]: doc for doc in k8s_documents(variant) if doc["kind"] == "Service"}
    seen = set()
    for workload, container in k8s_containers(variant):
        module, args = module_of(container["command"] + container.get("args", []))
        seen.add(module)
        env = k8s_env(container, variant)
        assert set(env) <= accepted_env(module), set(env) - accepted_env(module)
        config = parse(module, args, env, monkeypatch)

        host, port = config.listen.rsplit(":", 1)
        assert host == "0.0.0.0", "in a pod the service must listen on all interfaces"
        assert exposure_of(config) == Exposure(), "so it serves TLS and requires tokens, without --insecure"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": int(port)}
        files = provided_files(workload, container)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe == "livenessProbe" and "tcpSocket" in container[probe]:
                assert container[probe]["tcpSocket"] == {"port": "grpc"}
                continue
            command = container[probe]["exec"]["command"]
            assert command[:3] == HEALTHCHECK and command[-1] == f"127.0.0.1:{port}", probe
            assert command[command.index("--tls-ca") + 1] in files, probe

        for name, path in file_settings(config).items():
            assert str(path) in files, f"{module} --{name} names {path}, which no Secret provides"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        if getattr(config, "store", None) is None:
            assert str(config.data_dir.parent) == mounts["data"], "the service makes its data directory, 0700"
            assert str(config.data_dir) in image().data_dirs
        else:
            assert "data" not in mounts, "on PostgreSQL the replicas keep nothing of their own"

        name = workload["metadata"]["name"]
        service = services[name]
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == "grpc"
        assert service["spec"]["ports"][0]["port"] == int(port)
        if module == "status_svc":
            orchestrator = services["stepstream-orchestrator"]["spec"]["ports"][0]["port"]
            assert config.orchestrators == [f"stepstream-orchestrator:{orchestrator}"]
    assert seen == set(CONFIGS)


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_k8s_pods_run_unprivileged_on_a_read_only_root_filesystem(variant: str) -> None:
    made = image()
    for workload in k8s_workloads(variant):
        spec = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == made.uid, name
        assert pod["runAsGroup"] == made.gid and pod["fsGroup"] == made.gid, name
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        claims = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == made.uid, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert not context.get("privileged"), container["name"]
            for mount in container["volumeMounts"]:
                if secret_items(volumes.get(mount["name"], {})):
                    assert mount.get("readOnly") is True, (container["name"], mount)
        # Writable: the data volume (none for the replicas on PostgreSQL) and /tmp for the service; its init
        # container only writes the copies.
        [service] = spec["containers"]
        writable = {m["mountPath"]: m["name"] for m in service["volumeMounts"] if not m.get("readOnly")}
        on_postgres = variant == "k8s-postgres" and name == "stepstream-status"
        assert set(writable) == ({"/tmp"} if on_postgres else {"/data", "/tmp"}), name
        if not on_postgres:
            data = volumes.get(writable["/data"], {})
            assert "persistentVolumeClaim" in data or writable["/data"] in claims, name
        assert "emptyDir" in volumes[writable["/tmp"]], name
        for init in spec.get("initContainers", []):
            written = [m["mountPath"] for m in init["volumeMounts"] if not m.get("readOnly")]
            assert written == [init["command"][4]], init["name"]


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_network_policies_let_in_only_the_status_service_and_clients(variant: str) -> None:
    policies = [doc for doc in k8s_documents(variant) if doc["kind"] == "NetworkPolicy"]
    pods = {}
    for workload in k8s_workloads(variant):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert not CLIENT_LABEL.items() <= labels.items(), "a service is not let in as a client"
        [container] = workload["spec"]["template"]["spec"]["containers"]
        pods[container["command"][2]] = (labels, container["ports"][0]["containerPort"])

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return bool(selector["matchLabels"].items() <= labels.items())

    def policy_of(labels: dict[str, str]) -> dict[str, Any]:
        [policy] = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        return policy

    def admitted(policy: dict[str, Any]) -> tuple[list[dict[str, str]], set[int]]:
        """Who a policy lets in (their labels), and to which ports."""
        sources = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        ports = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        return sources, ports

    orchestrator_labels, orchestrator_port = pods["orchestrator_svc"]
    status_labels, status_port = pods["status_svc"]
    sources, ports = admitted(policy_of(orchestrator_labels))
    assert ports == {orchestrator_port}
    assert sorted(map(str, sources)) == sorted(map(str, [
        next(s for s in sources if s.items() <= status_labels.items()), CLIENT_LABEL,
    ])), "the orchestrator lets in the status service's pods and clients, no one else"
    sources, ports = admitted(policy_of(status_labels))
    assert ports == {status_port}
    assert sources == [CLIENT_LABEL], "the status service lets in clients only"


# --- Docker Compose -----------------------------------------------------------------------------------------


# docker-compose.yml (SQLite) and docker-compose.postgres.yml (replicas on PostgreSQL, behind Envoy).
COMPOSE_FILES = {"compose": "docker-compose.yml", "compose-postgres": "docker-compose.postgres.yml"}


class ComposeLoader(yaml.SafeLoader):
    """YAML as docker compose reads it, for the tags our files use: `!reset`
    (drop what `extends` brought)."""


RESET = object()
ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def merged(base: Any, override: Any, key: str = "") -> Any:
    """`override` over `base` by compose's rules for `extends`: mappings merge,
    sequences add up (command, entrypoint and a healthcheck's test are
    replaced), `!reset` removes."""
    if isinstance(base, dict) and isinstance(override, dict):
        result = dict(base)
        for name, value in override.items():
            if value is RESET:
                result.pop(name, None)
            else:
                result[name] = merged(result[name], value, name) if name in result else value
        return result
    if isinstance(base, list) and isinstance(override, list) and key not in ("command", "entrypoint", "test"):
        return base + [item for item in override if item not in base]
    return override


def compose(variant: str = "compose") -> dict[str, Any]:
    """The compose file, each service with what it `extends` merged in."""
    return compose_file(COMPOSE_FILES[variant])


def compose_file(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((DEPLOY / name).read_text(), ComposeLoader)  # a SafeLoader
    for service_name, service in loaded["services"].items():
        extends = service.pop("extends", None)
        if extends is not None:
            base = compose_file(extends["file"])["services"][extends["service"]]
            loaded["services"][service_name] = merged(base, service)
    return loaded


def stepstream_services(variant: str) -> dict[str, dict[str, Any]]:
    """The compose services that run ours (python -m ...), by name."""
    return {name: service for name, service in compose(variant)["services"].items()
            if service.get("command", [])[:2] == ["python", "-m"]}


def compose_settings(
    monkeypatch: pytest.MonkeyPatch, variant: str = "compose"
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each service's config as the compose file sets it, and its compose service."""
    found = {}
    for service in stepstream_services(variant).values():
        module, args = module_of(service["command"])
        env = {key: str(value) for key, value in service.get("environment", {}).items()}
        found[module] = (parse(module, args, env, monkeypatch), service)
    return found


@pytest.mark.parametrize("variant", list(COMPOSE_FILES))
def test_compose_matches_what_the_services_accept(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made = image()
    secrets = compose(variant)["secrets"]
    for name, service in stepstream_services(variant).items():
        module, _ = module_of(service["command"])
        env = {key: str(value) for key, value in service.get("environment", {}).items()}
        assert set(env) <= accepted_env(module), set(env) - accepted_env(module)
        config = compose_settings(monkeypatch, variant)[module][0]
        assert exposure_of(config) == Exposure(), "it serves TLS and requires tokens, without --insecure"
        port = port_of(config.listen)
        if getattr(config, "store", None) is None:
            assert any(mapping == f"127.0.0.1:{port}:{port}" for mapping in service["ports"])
            assert any(volume.endswith(f":{config.data_dir}") for volume in service["volumes"])
            assert str(config.data_dir) in made.data_dirs, "a named volume there starts as the image's directory"
        else:  # replicas: reached through the proxy (see the next test), keeping nothing of their own
            assert "ports" not in service and "volumes" not in service, name
        mounted = {f"/run/secrets/{secret}" for secret in service["secrets"]}
        assert set(service["secrets"]) <= set(secrets), name
        for setting, path in file_settings(config).items():
            assert str(path) in mounted, f"{name} --{setting} names {path}, which no secret provides"
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", *HEALTHCHECK] and test[-1] == f"127.0.0.1:{port}"
        assert test[test.index("--tls-ca") + 1] in mounted
        assert service["user"] == made.user
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]
        if module == "status_svc":
            orchestrator_port = port_of(compose_settings(monkeypatch, variant)["orchestrator_svc"][0].listen)
            assert config.orchestrators == [f"orchestrator:{orchestrator_port}"], name


def test_compose_postgres_puts_the_replicas_behind_one_address_and_keeps_the_password_in_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two or more status replicas on the PostgreSQL service's database (URL
    without a password, the password a secret file both read), and Envoy
    (deploy/envoy-status.yaml) publishing one address: TLS with the services'
    certificate, every call to a replica of the status service that passes
    grpc.health."""
    loaded = compose("compose-postgres")
    services = loaded["services"]
    config, status = compose_settings(monkeypatch, "compose-postgres")["status_svc"]
    assert status == services["status"] and status["deploy"]["replicas"] >= 2
    postgres = services["postgres"]
    url = urlsplit(config.store)
    assert (url.scheme, url.hostname, url.username, url.path, url.password) == (
        "postgresql", "postgres", postgres["environment"]["POSTGRES_USER"],
        "/" + postgres["environment"]["POSTGRES_DB"], None)
    password = f"/run/secrets/{PurePosixPath(str(config.store_password_file)).name}"
    assert str(config.store_password_file) == password == postgres["environment"]["POSTGRES_PASSWORD_FILE"]
    assert password.rsplit("/", 1)[1] in postgres["secrets"]
    assert status["depends_on"]["postgres"] == {"condition": "service_healthy"}

    proxy = services["proxy"]
    [published] = proxy["ports"]
    status_port = port_of(config.listen)
    assert published == f"127.0.0.1:{status_port}:{status_port}", "the status service's address, as without replicas"
    [mounted_config] = proxy["configs"]
    envoy = yaml.safe_load((DEPLOY / loaded["configs"][mounted_config["source"]]["file"]).read_text())
    assert proxy["command"][proxy["command"].index("--config-path") + 1] == mounted_config["target"]
    [listener] = envoy["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == status_port
    [chain] = listener["filter_chains"]
    [certificate] = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
    proxy_secrets = {f"/run/secrets/{secret}" for secret in proxy["secrets"]}
    assert {certificate["certificate_chain"]["filename"], certificate["private_key"]["filename"]} <= proxy_secrets
    [cluster] = envoy["static_resources"]["clusters"]
    [endpoints] = cluster["load_assignment"]["endpoints"]
    [endpoint] = endpoints["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "status", "port_value": status_port}
    assert cluster["type"] == "STRICT_DNS", "every replica behind the one name"
    [health] = cluster["health_checks"]
    assert health["grpc_health_check"] == {} and health["unhealthy_threshold"] == 1
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] in proxy_secrets
    for key in ("user", "read_only", "tmpfs", "cap_drop", "security_opt"):
        assert proxy[key] == status[key], key


# --- the deployed settings, run -----------------------------------------------------------------------------


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


def argv_of(config: ServiceConfig, **replaced: Any) -> list[str]:
    """Flags that give a service `config`, less the settings left at their
    defaults, with the values of `replaced` in place of its own."""
    argv = []
    for option in options(type(config)):
        value = replaced.get(option.name, getattr(config, option.name))
        if value == option.default or value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        argv.append(f"{option.flag}={str(value).lower() if isinstance(value, bool) else value}")
    return argv


def replicas_of(deployment: str, source: dict[str, Any]) -> int:
    """How many processes a compose service or a Kubernetes container's workload runs."""
    if deployment.startswith("compose"):
        return int(source.get("deploy", {}).get("replicas", 1))
    [workload] = [w for w, c in k8s_containers(deployment) if c == source]
    return int(workload["spec"].get("replicas", 1))


@pytest.mark.parametrize("deployment", [*COMPOSE_FILES, *K8S_VARIANTS])
async def test_the_deployed_settings_serve_tls_and_tokens_and_the_status_service_follows(
    deployment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both services with every setting the deploy files give them (on all
    interfaces), but their own ports and data directories here and local files
    for the secrets (and a fresh PostgreSQL database for a store there): each
    process (every status replica) passes its deploy file's probe, a call
    without a token is refused, and a job submitted to the orchestrator
    reaches every status replica, which follow it over TLS with the follower
    token (one ingesting, the others from the database)."""
    deployed = compose_settings(monkeypatch, deployment) if deployment in COMPOSE_FILES else \
        k8s_settings(monkeypatch, deployment)
    ca = Authority(tmp_path / "ca")
    server = ca.issue("server", hosts=("127.0.0.1", "localhost"))
    follower, follower_token = new_entry("status", "follower")
    operator, operator_token = new_entry("ci", "operator")
    viewer, viewer_token = new_entry("ci", "viewer")
    secrets = tmp_path / "secrets"
    tokens = {
        "orchestrator_svc": private_file(secrets / "orchestrator-tokens", f"{follower.line()}\n{operator.line()}\n"),
        "status_svc": private_file(secrets / "status-tokens", f"{viewer.line()}\n"),
    }
    addresses: dict[str, list[str]] = {
        module: [f"127.0.0.1:{free_port()}" for _ in range(replicas_of(deployment, deployed[module][1]))]
        for module in CONFIGS
    }
    for name in accepted_env("orchestrator_svc") | accepted_env("status_svc"):
        monkeypatch.delenv(name, raising=False)  # only the flags count
    processes: list[tuple[str, ServiceProcess]] = []
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(fresh_database()) if deployed["status_svc"][0].store else None

        def stop_all() -> None:
            for _, process in reversed(processes):
                process.stop()

        stack.callback(stop_all)
        for module in CONFIGS:  # the orchestrator first: the status service follows it
            config, _ = deployed[module]
            for n, address in enumerate(addresses[module]):
                replaced: dict[str, Any] = {
                    "listen": f"0.0.0.0:{port_of(address)}", "data_dir": tmp_path / "data" / f"{module}-{n}",
                    "tls_cert": server.cert, "tls_key": server.key, "tokens_file": tokens[module],
                }
                if module == "status_svc":
                    replaced.update(orchestrators=addresses["orchestrator_svc"], orchestrator_tls_ca=ca.cert,
                                    orchestrator_token_file=private_file(secrets / f"orchestrator-{n}.token",
                                                                         follower_token))
                    if database is not None:  # the test server trusts local connections: any password does
                        replaced.update(store=database.dsn,
                                        store_password_file=private_file(secrets / f"store-{n}", "unused\n"))
                assert set(file_settings(config)) <= set(replaced), "every file the deploy names has a local stand-in"
                processes.append((address, ServiceProcess(module, argv_of(config, **replaced))))
                processes[-1][1].start()

        for module, (_, source) in deployed.items():
            probe = source["healthcheck"]["test"][1:] if deployment in COMPOSE_FILES else \
                source["readinessProbe"]["exec"]["command"]
            for address in addresses[module]:
                argv = [*probe[3:-1], address]
                argv[argv.index("--tls-ca") + 1] = str(ca.cert)
                probing = await asyncio.create_subprocess_exec(sys.executable, *probe[1:3], *argv, cwd=REPO,
                                                               stderr=asyncio.subprocess.PIPE)
                _, stderr = await probing.communicate()
                assert probing.returncode == 0, (module, address, stderr.decode())

        tls = ClientTLS.from_files(ca.cert)
        [orchestrator_address] = addresses["orchestrator_svc"]
        async with open_channel(orchestrator_address, tls=tls) as orchestrator_channel:
            orchestrator = orch_grpc.OrchestratorServiceStub(orchestrator_channel)
            submit = orch_pb.SubmitJobRequest(definition=job_definition([{"name": "one", "type": "sleep",
                                                                           "seconds": 0}]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await orchestrator.SubmitJob(submit)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            accepted = await orchestrator.SubmitJob(submit, metadata=bearer_metadata(operator_token))
        for address in addresses["status_svc"]:
            async with open_channel(address, tls=tls) as status_channel:
                status = status_grpc.StatusServiceStub(status_channel)

                async def followed(
                    status: status_grpc.StatusServiceAsyncStub = status,
                ) -> status_pb.GetJobResponse | None:
                    try:
                        return await status.GetJob(status_pb.GetJobRequest(job_id=accepted.job.id),
                                                   metadata=bearer_metadata(viewer_token))
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.NOT_FOUND:
                            return None
                        raise

                await eventually(followed, f"the status service at {address} to have the job from the orchestrator")
        if database is not None:  # the replicas' pods and containers give them no volume: they need none
            assert not list((tmp_path / "data").glob("status_svc-*")), "a replica on PostgreSQL wrote to --data-dir"


# --- Monitoring: deploy/k8s-monitoring, the base with metrics on --------------------------------------------

MONITORING = DEPLOY / "k8s-monitoring"


def test_the_monitoring_overlay_serves_metrics_where_prometheus_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each patch names a workload and container of the base and sets a
    --metrics-listen its service accepts, on all interfaces, on the port that
    the container's `metrics` port, the prometheus.io/port annotation, the
    NetworkPolicy and the PodMonitor all name."""
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"][0] == "../k8s"
    patches = [patch["path"] for patch in kustomization["patches"]]
    present = {path.name for path in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    # The PodMonitor needs the Prometheus Operator's CRD: applied on its own, not listed.
    assert {*kustomization["resources"][1:], *patches} == present - {"podmonitor.yaml"}
    base = {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents()}
    ports, patched = set(), set()
    for path in patches:
        patch = yaml.safe_load((MONITORING / path).read_text())
        workload = base[(patch["kind"], patch["metadata"]["name"])]
        template = patch["spec"]["template"]
        [container] = template["spec"]["containers"]
        [base_container] = [each for each in workload["spec"]["template"]["spec"]["containers"]
                            if each["name"] == container["name"]]
        module, args = module_of(base_container["command"] + base_container.get("args", []))
        env = {**k8s_env(base_container), **{item["name"]: item["value"] for item in container["env"]}}
        assert set(env) <= accepted_env(module), set(env) - accepted_env(module)
        host, port = parse(module, args, env, monkeypatch).metrics_listen.rsplit(":", 1)
        assert host == "0.0.0.0", "Prometheus scrapes the pod's IP"
        assert container["ports"] == [{"name": "metrics", "containerPort": int(port)}]
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
        ports.add(int(port))
        patched.add(module)
    assert patched == set(CONFIGS)
    policy = yaml.safe_load((MONITORING / "network-policy.yaml").read_text())
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == ports
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert all(selected.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
               for workload in k8s_workloads())
    assert [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "prometheus"}], "only Prometheus is let in to the metrics port"
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"] == selected
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
