"""A worker plugin installed next to the orchestrator the documented way (its own
distribution, registered under the `stepstream.workers` entry point group) runs
like a built-in type: as a step and as a fan-out child; its validation rejects a
bad definition whole; and an orchestrator without it knows no such type.

Real pip install of tests/plugins/example_worker, real orchestrator processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.states import TERMINAL_JOB_STATES
from stepstream_client.errors import InvalidArgumentError, from_rpc_error

from orchestrator_svc.app import start
from orchestrator_svc.workers import FieldViolation, Params, WorkContext, Worker, WorkerCatalog
from orchestrator_svc.workers.registry import WorkerRegistry
from tests.conftest import orchestrator_config
from tests.helpers import REPO, ServiceProcess, channel, job_definition, wait_job_state

if TYPE_CHECKING:
    from stepstream.orchestrator.v1.orchestrator_service_pb2_grpc import OrchestratorServiceAsyncStub as Stub
else:
    Stub = orch_grpc.OrchestratorServiceStub

PLUGIN = REPO / "tests" / "plugins" / "example_worker"
ENDED = set(TERMINAL_JOB_STATES)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example plugin, for the orchestrator's PYTHONPATH."""
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--target", str(target), str(PLUGIN)],
        check=True, capture_output=True, text=True,
    )
    return target


@asynccontextmanager
async def orchestrator(data_dir: Path, plugin_site: Path | None) -> AsyncIterator[Stub]:
    """A real orchestrator process (with the plugin on its path, if given) and a stub to it."""
    path = [str(plugin_site)] if plugin_site is not None else []
    path += [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    process = ServiceProcess(
        "orchestrator_svc",
        ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--log-level", "warning"],
        env={"PYTHONPATH": os.pathsep.join(path)},
    )
    try:
        process.start()
        async with channel(process.address) as ch:
            yield orch_grpc.OrchestratorServiceStub(ch)
    finally:
        process.stop()


async def rejected(stub: Stub, steps: list[Mapping[str, Any]]) -> InvalidArgumentError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgumentError)
    return error


async def test_a_plugin_worker_runs_as_a_step_and_as_a_fanout_child(plugin_site: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    steps: list[Mapping[str, Any]] = [
        {"name": "greet", "type": "shout", "text": "hello", "path": str(out / "greet.txt"), "times": 3},
        {"name": "fan", "type": "fanout", "items": ["a", "b"],
         "child": {"type": "shout", "text": "item {item}", "path": str(out / "child-{index}.txt")}},
    ]
    async with orchestrator(tmp_path / "orchestrator", plugin_site) as stub:
        accepted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=job_definition(steps)))
        done = await wait_job_state(stub, accepted.job.id, ENDED)
    assert done.job.state == s.JOB_STATE_COMPLETED, done.job.message
    assert {view.step.name: view.step.message for view in done.steps}["greet"] == "shouted 8 characters"
    assert (out / "greet.txt").read_text() == "HELLO!!!\n"
    assert (out / "child-0.txt").read_text() == "ITEM A!\n"
    assert (out / "child-1.txt").read_text() == "ITEM B!\n"


async def test_a_bad_plugin_parameter_rejects_the_definition_whole(plugin_site: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    steps: list[Mapping[str, Any]] = [
        {"name": "first", "type": "command", "command": ["touch", str(marker)]},
        {"name": "loud", "type": "shout", "text": "   ", "path": str(tmp_path / "shouted.txt")},
        {"name": "fan", "type": "fanout", "count": 1,
         "child": {"type": "shout", "text": "x", "path": "relative.txt", "times": 11}},
    ]
    async with orchestrator(tmp_path / "orchestrator", plugin_site) as stub:
        error = await rejected(stub, steps)
        listed = await stub.ListJobs(orch_pb.ListJobsRequest())
    assert sorted((v.field, v.description) for v in error.violations) == [
        ("definition.steps[1].params.text", "must not be blank: there is nothing to shout"),
        ("definition.steps[2].params.child.path", "must be an absolute path, got 'relative.txt'"),
        ("definition.steps[2].params.child.times", "must be at most 10, got 11"),
    ]
    assert list(listed.jobs) == []
    assert not marker.exists()
    assert not (tmp_path / "shouted.txt").exists()


async def test_an_orchestrator_without_the_plugin_rejects_its_type(tmp_path: Path) -> None:
    async with orchestrator(tmp_path / "orchestrator", None) as stub:
        error = await rejected(stub, [{"name": "loud", "type": "shout", "text": "hi", "path": str(tmp_path / "x")}])
    assert [(v.field, v.description) for v in error.violations] == [
        ("definition.steps[0].type", "unknown worker type 'shout' (one of: command, fanout, python, sleep)"),
    ]


class RaisesItsOwnTimeout(Worker):
    """A worker whose own call timed out (as an HTTP client's would)."""

    def validate(self, params: Params, path: str, catalog: WorkerCatalog) -> list[FieldViolation]:
        return []

    async def run(self, params: Params, context: WorkContext) -> str:
        raise TimeoutError("upstream did not answer")


async def test_a_workers_own_timeout_error_is_its_failure_not_the_attempts_timeout(tmp_path: Path) -> None:
    running = await start(orchestrator_config(tmp_path / "orchestrator"),
                          workers=WorkerRegistry({"upstream": RaisesItsOwnTimeout()}))
    try:
        async with channel(running.address) as ch:
            stub: Stub = orch_grpc.OrchestratorServiceStub(ch)
            definition = job_definition([{"name": "call", "type": "upstream", "timeout": "1h"}])
            accepted = await stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition))
            done = await wait_job_state(stub, accepted.job.id, ENDED)
    finally:
        await running.stop()
    [view] = done.steps
    step = view.step
    assert (step.state, step.reason) == (s.STEP_STATE_FAILED, s.REASON_WORK_FAILED)
    assert step.message == "worker error: TimeoutError: upstream did not answer"
