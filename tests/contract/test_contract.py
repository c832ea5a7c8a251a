"""The API contract: generated code matches the .proto files, the protos pass
buf lint (and a style violation would not), and a stock gRPC tool (grpcurl)
can list, describe and call the orchestrator with no .proto files at hand."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb

from orchestrator_svc.app import Orchestrator
from tests.helpers import DEADLINE, REPO, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

PROTO_ROOT = REPO / "protos"
# The contract as released: what `buf breaking` compares the protos with. Rebuild it
# (buf build -o protos/contract.binpb) only when a new major version is cut.
RELEASED_CONTRACT = PROTO_ROOT / "contract.binpb"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def committed_generated_code(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "stepstream").rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def tool(name: str) -> str:
    """A binary from the dev extras, found as the generator finds its protoc plugins."""
    try:
        found: str = load_generator().tool(name)
    except SystemExit as missing:
        pytest.fail(str(missing))
    return found


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) generated code is up to date -------------------------------------------------------------


def test_committed_generated_code_matches_the_protos(tmp_path: Path) -> None:
    generated = sorted(p.relative_to(tmp_path) for p in load_generator().generate(tmp_path))
    committed = committed_generated_code(PROTO_ROOT)
    assert generated == committed, "generated and committed files differ"
    protos = list(PROTO_ROOT.glob("stepstream/*/v1/*.proto"))
    with_services = [p for p in protos if "\nservice " in p.read_text()]
    assert len(generated) == 2 * len(protos) + 2 * len(with_services), "no empty *_pb2_grpc modules"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (PROTO_ROOT / p).read_bytes()]
    assert stale == [], f"out of date (run python scripts/gen_protos.py): {stale}"


def test_each_service_has_its_own_proto_package() -> None:
    """No request or response name carries its service's name: each service has its package."""
    for module, package in ((orch_pb, "stepstream.orchestrator.v1"), (status_pb, "stepstream.status.v1")):
        assert module.DESCRIPTOR.package == package
        (service,) = module.DESCRIPTOR.services_by_name.values()
        for method in service.methods:
            for message in (method.input_type, method.output_type):
                assert message.full_name.startswith(package + ".")
                assert not message.name.startswith(service.name), message.full_name


# --- (b) buf lint ---------------------------------------------------------------------------------


def buf_lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("buf"), "lint"], cwd=root, capture_output=True, text=True, timeout=DEADLINE, check=False
    )


def test_buf_lint_passes() -> None:
    result = buf_lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def copy_protos(into: Path) -> Path:
    """The buf module (buf.yaml and every .proto) in `into`; returns the copy's protos/."""
    shutil.copy(REPO / "buf.yaml", into / "buf.yaml")
    for proto in PROTO_ROOT.glob("stepstream/*/v1/*.proto"):
        target = into / "protos" / proto.relative_to(PROTO_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, target)
    return into / "protos"


def test_buf_lint_catches_an_enum_without_unspecified(tmp_path: Path) -> None:
    protos = copy_protos(tmp_path)
    assert buf_lint(tmp_path).returncode == 0, "the unmodified copy must pass"

    with (protos / "stepstream" / "common" / "v1" / "states.proto").open("a") as states:
        states.write("\n// Deliberately wrong.\nenum Color {\n  COLOR_RED = 0;\n  COLOR_BLUE = 1;\n}\n")
    result = buf_lint(tmp_path)
    assert result.returncode != 0
    assert 'Enum zero value name "COLOR_RED" should be suffixed with "_UNSPECIFIED"' in result.stdout


def buf_breaking(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("buf"), "breaking", "--against", str(RELEASED_CONTRACT)],
        cwd=root, capture_output=True, text=True, timeout=DEADLINE, check=False,
    )


def test_the_protos_stay_wire_compatible_with_the_released_contract() -> None:
    result = buf_breaking(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(tmp_path: Path) -> None:
    records = copy_protos(tmp_path) / "stepstream" / "common" / "v1" / "records.proto"
    assert buf_breaking(tmp_path).returncode == 0, "the unmodified copy must pass"
    text = records.read_text()
    assert "  string message = 5;" in text
    records.write_text(text.replace("  string message = 5;", "  string message = 15;", 1))
    result = buf_breaking(tmp_path)
    assert result.returncode != 0
    assert "changed" in result.stdout or "deleted" in result.stdout, result.stdout


# --- (c) grpcurl against a real orchestrator ------------------------------------------------------


async def grpcurl(
    address: str, *args: str, data: Any = None, flags: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """Run `grpcurl -plaintext FLAGS [-d DATA] ADDRESS ARGS...` as a subprocess
    (the server under test keeps serving on this event loop meanwhile)."""
    command = [tool("grpcurl"), "-plaintext", *flags]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [address, *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def json_messages(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON object per response message."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return messages
        message, position = decoder.raw_decode(text, position)
        messages.append(message)


async def test_grpcurl_lists_and_describes(orchestrator: Orchestrator) -> None:
    code, out, err = await grpcurl(orchestrator.address, "list")
    assert code == 0, err
    services = out.split()
    for name in ("stepstream.orchestrator.v1.OrchestratorService", "grpc.health.v1.Health",
                 "grpc.reflection.v1alpha.ServerReflection"):
        assert name in services

    code, out, err = await grpcurl(orchestrator.address, "describe", "stepstream.orchestrator.v1.OrchestratorService")
    assert code == 0, err
    assert "stepstream.orchestrator.v1.OrchestratorService is a service:" in out
    for rpc in ("SubmitJob", "CancelJob", "GetJob", "ListJobs", "StreamStepEvents", "StreamSnapshot"):
        assert f"rpc {rpc} (" in out
    assert "returns ( stream .stepstream.orchestrator.v1.StreamStepEventsResponse )" in out

    code, out, err = await grpcurl(orchestrator.address, "describe", "stepstream.common.v1.StepState")
    assert code == 0, err
    assert "STEP_STATE_UNSPECIFIED = 0;" in out and "(.stepstream.common.v1.terminal) = true" in out


async def test_grpcurl_calls(orchestrator: Orchestrator, orchestrator_stub: Stub) -> None:
    address = orchestrator.address
    code, out, err = await grpcurl(address, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    code, out, err = await grpcurl(
        address, "grpc.health.v1.Health/Check", data={"service": "stepstream.orchestrator.v1.OrchestratorService"}
    )
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}

    definition = {
        "name": "from-grpcurl",
        "steps": [
            {"name": "hello", "type": "command", "timeout": "5s", "params": {"command": ["echo", "hi"]}},
            {"name": "fan", "type": "fanout", "retryBackoff": "10ms",
             "params": {"items": ["a", "b"], "child": {"type": "sleep", "seconds": 0}}},
        ],
    }
    code, out, err = await grpcurl(
        address, "stepstream.orchestrator.v1.OrchestratorService/SubmitJob",
        data={"definition": definition, "requestId": "r1"},
    )
    assert code == 0, err
    submitted = json.loads(out)
    job_id = submitted["job"]["id"]
    assert submitted["job"]["state"] == "JOB_STATE_PENDING"
    assert submitted["seq"] == "1"  # int64 in JSON is a string
    await wait_job_state(orchestrator_stub, job_id, {s.JOB_STATE_COMPLETED})

    code, out, err = await grpcurl(
        address, "stepstream.orchestrator.v1.OrchestratorService/StreamStepEvents", data={"afterSeq": "0"},
        flags=("-max-time", "1.5"),
    )
    messages = json_messages(out)
    events = [event for m in messages for event in m.get("batch", {}).get("events", [])]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    mine = [e for e in events if e.get("job", {}).get("id") == job_id]
    assert [e["job"]["state"] for e in mine] == ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_COMPLETED"]
    hello = [e["step"] for e in events if e.get("step", {}).get("name") == "hello"]
    assert [st["state"] for st in hello] == ["STEP_STATE_PENDING", "STEP_STATE_RUNNING", "STEP_STATE_COMPLETED"]
    assert hello[-1]["message"] == "exit 0: hi"
    children = [e["child"] for e in events if "child" in e]
    completed = [c for c in children if c["state"] == "STEP_STATE_COMPLETED"]
    # Zero values are left out of JSON: child 0 has no "index".
    assert sorted((c.get("index", 0), c["item"]) for c in completed) == [(0, "a"), (1, "b")]
    # grpcurl prints the .proto field names (log_id), and int64 values as strings.
    assert messages[0]["log_id"] and all(m["log_id"] == messages[0]["log_id"] for m in messages)
    # The stream stayed open until -max-time, with heartbeats carrying the latest seq.
    heartbeats = [m["heartbeat"] for m in messages if "heartbeat" in m]
    assert heartbeats and all(h["latest_seq"] == events[-1]["seq"] for h in heartbeats)
    assert code != 0 and "DeadlineExceeded" in err

    code, out, err = await grpcurl(
        address, "stepstream.orchestrator.v1.OrchestratorService/GetJob", data={"jobId": job_id}
    )
    assert code == 0, err
    view = json.loads(out)
    assert view["job"]["state"] == "JOB_STATE_COMPLETED"
    assert view["steps"][1]["children"] == {"total": 2, "completed": 2}
    assert view["definition"]["steps"][0]["params"] == {"command": ["echo", "hi"]}

    code, out, err = await grpcurl(
        address, "stepstream.orchestrator.v1.OrchestratorService/GetJob", data={"jobId": "nope"}
    )
    assert code != 0 and "Code: NotFound" in err

    code, out, err = await grpcurl(
        address, "stepstream.orchestrator.v1.OrchestratorService/SubmitJob",
        data={"definition": {"name": "bad", "steps": [{"name": "x", "type": "nope"}]}},
    )
    assert code != 0 and "Code: InvalidArgument" in err

    code, out, err = await grpcurl(address, "stepstream.orchestrator.v1.OrchestratorService/StreamSnapshot")
    assert code == 0, err
    snapshot = json_messages(out)
    assert {m["seq"] for m in snapshot} == {events[-1]["seq"]}

    listed = await orchestrator_stub.ListJobs(orch_pb.ListJobsRequest())
    assert [job.id for job in listed.jobs] == [job_id]
