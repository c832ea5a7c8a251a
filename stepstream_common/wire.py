"""Hand-assembled protobuf wire bytes for the hot streaming paths.

Events and watch updates are serialized once, when they are committed; a stream
then sends the same bytes to every subscriber and every replay, wrapping them
in their envelope by concatenation instead of re-parsing and re-serializing.
This is exactly the standard encoding of the declared message (fields in number
order, proto3 defaults omitted), so any protobuf client reads it as that
message; tests/contract/test_wire.py compares each envelope with the generated
code byte for byte. Field numbers are the generated code's (`*_FIELD_NUMBER`,
read from the descriptors), so the .proto files stay the only place they are
written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from google.protobuf.message import Message
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orchestrator_pb
from stepstream.status.v1 import status_service_pb2 as status_pb


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (a string, bytes or embedded message)."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def string_field(field_number: int, value: str) -> bytes:
    """One proto3 string field; the empty string is the default and omitted."""
    return length_delimited(field_number, value.encode()) if value else b""


def varint_field(field_number: int, value: int) -> bytes:
    """One varint field (int64, int32, bool, enum); zero is the default and omitted."""
    return varint(field_number << 3) + varint(value) if value else b""


def repeated(field_number: int, payloads: Iterable[bytes]) -> bytes:
    """A repeated message field: each element is its own length-delimited entry."""
    tag = varint(field_number << 3 | 2)
    return b"".join(tag + varint(len(p)) + p for p in payloads)


def chunks(payloads: list[bytes], max_items: int, max_bytes: int) -> list[list[bytes]]:
    """Split into runs of at most max_items and (unless one item is larger) max_bytes."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for payload in payloads:
        if current and (len(current) >= max_items or size + len(payload) > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(payload)
        size += len(payload)
    if current:
        out.append(current)
    return out


# --- The envelopes -------------------------------------------------------------------------------------------------

_EVENTS_LOG_ID = orchestrator_pb.StreamStepEventsResponse.LOG_ID_FIELD_NUMBER
_EVENTS_BATCH = orchestrator_pb.StreamStepEventsResponse.BATCH_FIELD_NUMBER
_BATCH_EVENTS = orchestrator_pb.StepEventBatch.EVENTS_FIELD_NUMBER
_SNAPSHOT_LOG_ID = orchestrator_pb.StreamSnapshotResponse.LOG_ID_FIELD_NUMBER
_SNAPSHOT_SEQ = orchestrator_pb.StreamSnapshotResponse.SEQ_FIELD_NUMBER
_SNAPSHOT_RECORDS = orchestrator_pb.StreamSnapshotResponse.RECORDS_FIELD_NUMBER
_UPDATE_REVISION = status_pb.JobUpdate.REVISION_FIELD_NUMBER
_UPDATE_JOB_ID = status_pb.JobUpdate.JOB_ID_FIELD_NUMBER
_UPDATE_JOB = status_pb.JobUpdate.JOB_FIELD_NUMBER
_UPDATE_STEPS = status_pb.JobUpdate.STEPS_FIELD_NUMBER
_BATCH_UPDATES = status_pb.JobUpdateBatch.UPDATES_FIELD_NUMBER
WatchResponse = type[status_pb.WatchJobResponse] | type[status_pb.WatchJobsResponse]
_WATCH_UPDATES: dict[WatchResponse, int] = {
    status_pb.WatchJobResponse: status_pb.WatchJobResponse.UPDATES_FIELD_NUMBER,
    status_pb.WatchJobsResponse: status_pb.WatchJobsResponse.UPDATES_FIELD_NUMBER,
}


def step_events(log_id: str, events: Sequence[bytes]) -> bytes:
    """StreamStepEventsResponse{log_id, batch: StepEventBatch{events}} around encoded StepEvents."""
    return string_field(_EVENTS_LOG_ID, log_id) + length_delimited(_EVENTS_BATCH, repeated(_BATCH_EVENTS, events))


def snapshot_records(log_id: str, seq: int, records: Sequence[bytes]) -> bytes:
    """StreamSnapshotResponse{log_id, seq, records} around encoded StepEvents."""
    return (string_field(_SNAPSHOT_LOG_ID, log_id) + varint_field(_SNAPSHOT_SEQ, seq)
            + repeated(_SNAPSHOT_RECORDS, records))


def job_update_steps(steps: Iterable[bytes]) -> bytes:
    """JobUpdate.steps, from encoded StepStats: stored with a change, sent as they are."""
    return repeated(_UPDATE_STEPS, steps)


def job_update(revision: int, job_id: str, job: bytes | None, steps: bytes | None) -> bytes:
    """One JobUpdate as an entry of JobUpdateBatch.updates: `job` an encoded
    JobStatus (None: unchanged), `steps` what job_update_steps() made (None: none)."""
    data = varint_field(_UPDATE_REVISION, revision) + string_field(_UPDATE_JOB_ID, job_id)
    if job is not None:
        data += length_delimited(_UPDATE_JOB, job)
    if steps is not None:
        data += steps
    return length_delimited(_BATCH_UPDATES, data)


def watch_updates(response: WatchResponse, updates: Sequence[bytes]) -> bytes:
    """A WatchJob or WatchJobs response{updates: JobUpdateBatch} around job_update() entries."""
    return length_delimited(_WATCH_UPDATES[response], b"".join(updates))


M = TypeVar("M", bound=Message)


def clone(message: M) -> M:
    """An independent copy (messages held by a running job keep changing)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy
