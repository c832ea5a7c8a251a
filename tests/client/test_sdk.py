"""The async SDK against real services: submit, typed errors, reads, paging, the sync wrapper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from stepstream_client import (
    Client,
    DefinitionError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobView,
    NotFoundError,
    RetryPolicy,
    SyncClient,
    UnavailableError,
)
from stepstream_client.definitions import definition_from_mapping

from tests.client import services
from tests.client.services import QUICK_STATUS, Service, eventually, gate_step

QUICK = {"name": "quick", "steps": [{"name": "one", "type": "sleep", "seconds": 0}]}


@pytest.fixture
async def client(orchestrator: Service, status: Service) -> AsyncIterator[Client]:
    async with Client(orchestrator.address, status.address) as client:
        yield client


async def finished(client: Client, job_id: str) -> JobView:
    async def probe() -> JobView | None:
        view = await client.get(job_id)
        return view if view.terminal else None

    return await eventually(probe, f"job {job_id} to finish")


async def test_submit_from_a_toml_file_a_yaml_file_a_mapping_and_a_message(client: Client, tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('name = "from-toml"\n[[steps]]\nname = "one"\ntype = "sleep"\nseconds = 0\n')
    yaml = tmp_path / "job.yml"
    yaml.write_text("name: from-yaml\nsteps:\n  - name: one\n    type: sleep\n    seconds: 0\n")
    submitted = [
        await client.submit(toml),
        await client.submit(str(yaml)),
        await client.submit(QUICK),
        await client.submit(definition_from_mapping({**QUICK, "name": "from-message"})),
    ]
    assert [job.name for job in submitted] == ["from-toml", "from-yaml", "quick", "from-message"]
    assert len({job.id for job in submitted}) == 4
    assert all(job.state == "pending" and job.seq > 0 and job.created_at is not None for job in submitted)
    for job in submitted:
        view = await finished(client, job.id)
        assert (view.name, view.state, view.reason) == (job.name, "completed", "")


async def test_a_request_id_makes_submit_idempotent(client: Client) -> None:
    first = await client.submit(QUICK, request_id="nightly-2026-11-21")
    second = await client.submit(QUICK, request_id="nightly-2026-11-21")
    assert first.id == second.id


async def test_a_rejected_definition_raises_invalid_argument_with_every_violation(client: Client) -> None:
    bad = {"name": "bad", "steps": [
        {"name": "one", "type": "sleep", "seconds": 0},
        {"name": "two", "type": "sleep", "seconds": 0, "timeout": "10x"},
        {"name": "three", "type": "no-such-worker"},
    ]}
    with pytest.raises(InvalidArgumentError) as caught:
        await client.submit(bad)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = {violation.field for violation in error.violations}
    assert any(field.endswith("steps[1].timeout") for field in fields), fields
    assert any(field.endswith("steps[2].type") for field in fields), fields


async def test_a_file_that_is_not_a_definition_raises_definition_error(client: Client, tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(DefinitionError):
        await client.submit(broken)
    with pytest.raises(DefinitionError) as caught:
        await client.submit({"name": "x", "steps": [{"name": "one", "retries": "many"}]})
    assert [v.field for v in caught.value.violations] == ["steps[0].retries"]
    with pytest.raises(DefinitionError):
        await client.submit(tmp_path / "missing.toml")


async def test_an_unreachable_service_raises_unavailable_naming_the_address() -> None:
    nobody = services.nobody()
    async with Client(nobody, nobody, retry=RetryPolicy(deadline=0.5)) as client:
        with pytest.raises(UnavailableError) as on_submit:
            await client.submit(QUICK)
        with pytest.raises(UnavailableError) as on_get:
            await client.get("anything")
        with pytest.raises(UnavailableError):
            async with client.watch("anything") as views:
                await anext(views)
    assert nobody in on_submit.value.message and "orchestrator" in on_submit.value.message
    assert nobody in on_get.value.message and "status service" in on_get.value.message


async def test_unknown_jobs_raise_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError):
        await client.get("no-such-job")
    with pytest.raises(NotFoundError):
        await client.cancel("no-such-job")
    with pytest.raises(NotFoundError):
        async with client.watch("no-such-job") as views:
            await anext(views)


async def test_not_found_is_retried_only_for_a_bounded_time(orchestrator: Service, tmp_path: Path) -> None:
    """The orchestrator knows the job but this status service never will (it follows nobody)."""
    blind = services.status(tmp_path / "blind", services.nobody(), *QUICK_STATUS,
                            "--max-wait-applied", "0.5")
    await blind.start()
    try:
        async with Client(orchestrator.address, blind.address, ingest_grace=0.5,
                          retry=RetryPolicy(deadline=1.0)) as client:
            job = await client.submit(QUICK)
            # This client knows where its job is in the log: the service says it has not got there
            # (UNAVAILABLE, which it retries until its deadline).
            with pytest.raises(UnavailableError):
                await client.get(job.id)
        async with Client(orchestrator.address, blind.address, ingest_grace=0.5) as other:
            # Another client only has the id: NOT_FOUND, retried for the grace period.
            with pytest.raises(NotFoundError):
                await other.get(job.id)
            with pytest.raises(NotFoundError):
                async with other.watch(job.id) as views:
                    await anext(views)
    finally:
        await blind.kill()


async def test_get_list_and_children_map_server_fields(client: Client, tmp_path: Path) -> None:
    job = await client.submit({"name": "fan", "steps": [
        {"name": "prepare", "type": "sleep", "seconds": 0},
        {"name": "spread", "type": "fanout", "items": ["a", "b", "13", "c", "113", "d", "e"], "concurrency": 3,
         "max_child_failures": 2,
         "child": {"type": "python", "function": "demo.crawl", "args": {"item": "{item}"}}},
    ]})
    view = await finished(client, job.id)
    assert view.state == "completed"
    assert [step.name for step in view.steps] == ["prepare", "spread"]
    spread = view.step("spread")
    assert (spread.type, spread.state, spread.attempt, spread.max_attempts) == ("fanout", "completed", 1, 1)
    assert (spread.children.total, spread.children.completed, spread.children.failed) == (7, 5, 2)
    assert spread.duration is not None and spread.started_at is not None and spread.finished_at is not None
    assert view.step_counts.total == 2 and view.step_counts.completed == 2
    assert view.created_at is not None and view.finished_at is not None and not view.stale
    assert view.source == client.orchestrator_address

    children = [child async for child in client.children(job.id, "spread", page_size=2)]
    assert [child.index for child in children] == list(range(7))
    failed = [child async for child in client.children(job.id, "spread", states=["failed"])]
    assert [(child.index, child.item) for child in failed] == [(2, "13"), (4, "113")]
    assert all(child.reason == "work_failed" and "HTTP 503" in child.message for child in failed)
    with pytest.raises(NotFoundError):
        [child async for child in client.children(job.id, "no-such-step")]

    other = await client.submit(QUICK)
    await finished(client, other.id)
    listed = [summary.id async for summary in client.list(page_size=1)]
    assert listed[:2] == [other.id, job.id]
    assert [s.id async for s in client.list(name="fan", states=["completed"])] == [job.id]
    assert [s.id async for s in client.list(states=["failed"])] == []


async def test_cancel_is_recorded_and_repeatable_but_refused_for_a_finished_job(
    client: Client, tmp_path: Path
) -> None:
    job = await client.submit({"name": "long", "steps": [gate_step("wait", tmp_path / "never")]})

    async def running() -> JobView | None:
        view = await client.get(job.id)
        return view if view.step("wait").state == "running" else None

    await eventually(running, "the step to run")
    record = await client.cancel(job.id)
    assert record.id == job.id and record.cancel_requested_at is not None
    await client.cancel(job.id)
    view = await finished(client, job.id)
    assert (view.state, view.reason) == ("cancelled", "cancelled_by_request")
    assert view.step("wait").state == "cancelled"

    done = await client.submit(QUICK)
    await finished(client, done.id)
    with pytest.raises(FailedPreconditionError):
        await client.cancel(done.id)


async def test_sync_client_has_the_same_methods(orchestrator: Service, status: Service) -> None:
    """SyncClient blocks, so it runs in a thread here, off this test's loop."""

    def use() -> tuple[JobView, list[str], int]:
        with SyncClient(orchestrator.address, status.address) as client:
            job = client.submit({"name": "sync", "steps": [
                {"name": "spread", "type": "fanout", "count": 3, "child": {"type": "sleep", "seconds": 0}},
            ]})
            views = list(client.watch(job.id))
            every = client.watch_jobs()
            assert job.id in [summary.id for summary in next(every).jobs]
            every.close()
            listed = [summary.id for summary in client.list()]
            children = len(list(client.children(job.id, "spread")))
            assert client.get(job.id) == views[-1]
            return views[-1], listed, children

    final, listed, children = await asyncio.to_thread(use)
    assert final.state == "completed" and final.id in listed and children == 3


def test_sync_client_offers_every_public_method_of_the_async_client() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert public(Client) <= public(SyncClient), sorted(public(Client) - public(SyncClient))
