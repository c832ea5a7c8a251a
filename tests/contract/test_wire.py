"""The hand-assembled envelopes (stepstream_common.wire) are the generated
messages, byte for byte: empty, default and large values, and streams split
into several responses by the count and byte bounds (stepstream_common.streaming)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from stepstream.common.v1 import records_pb2
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.status.v1 import status_service_pb2 as status_pb

from orchestrator_svc.api.servicer import MAX_EVENTS_PER_MESSAGE
from status_svc.api.servicer import MAX_UPDATES_PER_MESSAGE
from stepstream_common import wire
from stepstream_common.streaming import MAX_BYTES_PER_MESSAGE, Envelope, enveloped

M = TypeVar("M", bound=Message)

LARGE = 2**63 - 1  # the largest int64: a ten-byte varint
LOG_IDS = ["", "log-1", "é" * 100]  # the last one's length takes a two-byte varint


def _event(seq: int, size: int = 0) -> records_pb2.StepEvent:
    return records_pb2.StepEvent(seq=seq, job=records_pb2.Job(id=f"job-{seq}", name="x" * size))


def _update(revision: int, size: int = 0) -> status_pb.JobUpdate:
    return status_pb.JobUpdate(revision=revision, job_id=f"job-{revision}",
                               job=status_pb.JobStatus(id=f"job-{revision}", message="x" * size))


# (items, how many responses they take): none, a default one, a few, large
# values, past the count bound, past the byte bound, one alone past the byte bound.
EVENTS = {
    "none": ([], 1),
    "one default": ([records_pb2.StepEvent()], 1),
    "a few": ([_event(seq) for seq in range(1, 4)], 1),
    "large values": ([_event(LARGE, 100_000)], 1),
    "past the count bound": ([_event(seq) for seq in range(1, 2 * MAX_EVENTS_PER_MESSAGE + 2)], 3),
    "past the byte bound": ([_event(seq, 300_000) for seq in range(1, 6)], 2),
    "one past the byte bound": ([_event(1), _event(2, MAX_BYTES_PER_MESSAGE + 1), _event(3)], 3),
}
UPDATES = {
    "none": ([], 1),
    "one default": ([status_pb.JobUpdate()], 1),
    "a few": ([_update(revision) for revision in range(1, 4)], 1),
    "large values": ([_update(LARGE, 100_000)], 1),
    "past the count bound": ([_update(revision) for revision in range(1, 2 * MAX_UPDATES_PER_MESSAGE + 2)], 3),
    "past the byte bound": ([_update(revision, 300_000) for revision in range(1, 6)], 2),
    "one past the byte bound": ([_update(1), _update(2, MAX_BYTES_PER_MESSAGE + 1), _update(3)], 3),
}


def _responses(
    items: Sequence[M], entry: Callable[[M], bytes], envelope: Envelope, max_items: int
) -> list[tuple[bytes, Sequence[M]]]:
    """Each response that enveloped() makes of `items` (for none: the envelope
    of none, as StreamSnapshot sends), with the items it must carry."""
    entries = [entry(item) for item in items]
    responses = list(enveloped(entries, envelope, max_items)) or [envelope([])]
    chunks = wire.chunks(entries, max_items, MAX_BYTES_PER_MESSAGE) or [[]]
    carried: list[tuple[bytes, Sequence[M]]] = []
    start = 0
    for response, chunk in zip(responses, chunks, strict=True):
        assert len(chunk) <= max_items
        carried.append((response, items[start:start + len(chunk)]))
        start += len(chunk)
    assert start == len(items)
    return carried


def _serialized(message: Message) -> bytes:
    return message.SerializeToString()


@pytest.mark.parametrize("log_id", LOG_IDS)
@pytest.mark.parametrize(("events", "responses"), EVENTS.values(), ids=EVENTS.keys())
def test_step_events(log_id: str, events: list[records_pb2.StepEvent], responses: int) -> None:
    carried = _responses(events, _serialized, functools.partial(wire.step_events, log_id), MAX_EVENTS_PER_MESSAGE)
    assert len(carried) == responses
    for response, chunk in carried:
        expected = orch_pb.StreamStepEventsResponse(log_id=log_id, batch=orch_pb.StepEventBatch(events=chunk))
        assert response == expected.SerializeToString()


@pytest.mark.parametrize("seq", [0, 1, LARGE])
@pytest.mark.parametrize("log_id", LOG_IDS)
@pytest.mark.parametrize(("records", "responses"), EVENTS.values(), ids=EVENTS.keys())
def test_snapshot_records(seq: int, log_id: str, records: list[records_pb2.StepEvent], responses: int) -> None:
    envelope = functools.partial(wire.snapshot_records, log_id, seq)
    carried = _responses(records, _serialized, envelope, MAX_EVENTS_PER_MESSAGE)
    assert len(carried) == responses
    for response, chunk in carried:
        expected = orch_pb.StreamSnapshotResponse(log_id=log_id, seq=seq, records=chunk)
        assert response == expected.SerializeToString()


STEPS = {
    "none": [],
    "one default": [status_pb.StepStats()],
    "a few": [status_pb.StepStats(name=name, index=index, state=s.STEP_STATE_RUNNING, revision=index + 1)
              for index, name in enumerate("abc")],
    "large values": [status_pb.StepStats(name="a", message="x" * 100_000, revision=LARGE)],
}


@pytest.mark.parametrize("steps", STEPS.values(), ids=STEPS.keys())
def test_job_update_steps(steps: list[status_pb.StepStats]) -> None:
    encoded = wire.job_update_steps(step.SerializeToString() for step in steps)
    assert encoded == status_pb.JobUpdate(steps=steps).SerializeToString()


@pytest.mark.parametrize(("revision", "job_id", "job", "steps"), [
    (0, "", None, None),
    (1, "job-1", status_pb.JobStatus(), None),
    (2, "job-1", status_pb.JobStatus(id="job-1", state=s.JOB_STATE_RUNNING, revision=2), STEPS["a few"]),
    (3, "job-1", None, STEPS["one default"]),
    (4, "job-1", None, STEPS["none"]),
    (LARGE, "j" * 1000, status_pb.JobStatus(id="j" * 1000, message="x" * 100_000), STEPS["large values"]),
], ids=["defaults", "default job", "job and steps", "default step", "no steps", "large values"])
def test_job_update(
    revision: int, job_id: str, job: status_pb.JobStatus | None, steps: list[status_pb.StepStats] | None
) -> None:
    entry = wire.job_update(
        revision, job_id, None if job is None else job.SerializeToString(),
        None if steps is None else wire.job_update_steps(step.SerializeToString() for step in steps),
    )
    update = status_pb.JobUpdate(revision=revision, job_id=job_id, job=job, steps=steps)
    assert entry == status_pb.JobUpdateBatch(updates=[update]).SerializeToString()


def _update_entry(update: status_pb.JobUpdate) -> bytes:
    return status_pb.JobUpdateBatch(updates=[update]).SerializeToString()


@pytest.mark.parametrize("response_type", [status_pb.WatchJobResponse, status_pb.WatchJobsResponse])
@pytest.mark.parametrize(("updates", "responses"), UPDATES.values(), ids=UPDATES.keys())
def test_watch_updates(response_type: wire.WatchResponse, updates: list[status_pb.JobUpdate], responses: int) -> None:
    envelope = functools.partial(wire.watch_updates, response_type)
    carried = _responses(updates, _update_entry, envelope, MAX_UPDATES_PER_MESSAGE)
    assert len(carried) == responses
    for response, chunk in carried:
        expected = response_type(updates=status_pb.JobUpdateBatch(updates=chunk))
        assert response == expected.SerializeToString()
