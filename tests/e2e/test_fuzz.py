"""Random and mutated requests at every RPC of both services, as real subprocesses.

Each example picks a method of either server (its own service, health,
reflection v1alpha and v1: every RPC, from the descriptors) and sends it
random bytes, or a request message built from the method's input descriptor
with random field values (strings, numbers out of range, unknown enum
values, Struct params of any shape, nested messages), as it is or mutated on
the wire (bytes flipped, cut short, garbage inserted). Unary calls are awaited;
streams are read for a moment (two messages) and cancelled. Every answer must
be a proper status: never UNKNOWN or INTERNAL (a servicer bug), never
UNAVAILABLE (a crash), and never a hang past the call's deadline. Afterwards
both services are SERVING, answer a normal call, and stop gracefully.

Bounded: EXAMPLES_PER_METHOD examples of each method (hypothesis,
deadline=None); a failure prints the example that falsified it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message, message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as orch_pb
from stepstream.orchestrator.v1 import orchestrator_service_pb2_grpc as orch_grpc
from stepstream.status.v1 import status_service_pb2 as status_pb

from stepstream_common import rpc
from tests.helpers import ServiceProcess, job_definition, orchestrator_process, status_process

# Per method (21 of them): about 300 examples in all.
EXAMPLES_PER_METHOD = 15
# Each unary call's deadline: a read that waits (not_older_than) ends by then.
CALL_DEADLINE = 1.0
# Each stream's deadline: it is read for this moment (two messages at most). A stream that sends one message
# and then waits (Health/Watch sends the next only on a change) ends here, DEADLINE_EXCEEDED, each example.
STREAM_DEADLINE = 0.3
# A broken server answers these; a client error or a limit never does.
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})
# Strings worth trying besides random text: names the services know, placeholders, edges.
WORDS = ["sleep", "fanout", "", "a", "{item}", "{index}", "secret", "items", "concurrency", "child",
         "seconds", "1s", "-1s", "1e300", "0", "*", "é", "\x00", "x" * 300]
# Never sent: a fuzzed definition must neither run code nor start a huge fan-out.
NOT_SENT = ("command", "python", "count")


@dataclass(frozen=True)
class Method:
    address: str
    path: str
    descriptor: MethodDescriptor

    @property
    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.descriptor.input_type)


def services_of(address: str, *services: ServiceDescriptor) -> list[Method]:
    found = [Method(address, f"/{service.full_name}/{method.name}", method)
             for service in services for method in service.methods]
    v1alpha = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods_by_name["ServerReflectionInfo"]
    return [*found, Method(address, f"/{rpc.V1_REFLECTION_SERVICE}/ServerReflectionInfo", v1alpha)]


@dataclass
class Fuzzed:
    orchestrator: ServiceProcess
    status: ServiceProcess
    channels: dict[str, grpc.Channel]
    methods: list[Method]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    orchestrator = orchestrator_process(root / "orchestrator", 0)
    status: ServiceProcess | None = None
    channels: dict[str, grpc.Channel] = {}
    try:
        orchestrator.start()
        status = status_process(root / "status", orchestrator.address)
        status.start()
        channels = {address: grpc.insecure_channel(address) for address in (orchestrator.address, status.address)}
        health = health_pb2.DESCRIPTOR.services_by_name["Health"]
        reflection = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
        methods = [
            *services_of(orchestrator.address, orch_pb.DESCRIPTOR.services_by_name["OrchestratorService"], health,
                         reflection),
            *services_of(status.address, status_pb.DESCRIPTOR.services_by_name["StatusService"], health, reflection),
        ]
        yield Fuzzed(orchestrator, status, channels, methods)
        assert_still_serving(orchestrator.address, status.address)
        assert status.terminate() == 0
        assert orchestrator.terminate() == 0
    finally:
        for ch in channels.values():
            ch.close()
        if status is not None:
            status.stop()
        orchestrator.stop()


def assert_still_serving(orchestrator: str, status: str) -> None:
    for address in (orchestrator, status):
        with grpc.insecure_channel(address) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, address
    with grpc.insecure_channel(orchestrator) as ch:
        stub = orch_grpc.OrchestratorServiceStub(ch)
        definition = job_definition([{"name": "a", "type": "sleep", "seconds": 0}])
        job = stub.SubmitJob(orch_pb.SubmitJobRequest(definition=definition), timeout=10)
        assert stub.GetJob(orch_pb.GetJobRequest(job_id=job.job.id), timeout=10).job.state != s.JOB_STATE_UNSPECIFIED


# --- requests built from descriptors -------------------------------------------------------------------------------

def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(WORDS), st.text(max_size=40)).filter(lambda t: t not in NOT_SENT)


def json_values() -> st.SearchStrategy[Any]:
    """What a google.protobuf.Value holds: JSON of any shape (numbers out of every range too)."""
    leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-(2**60), 2**60).map(float), texts())
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(texts(), inner, max_size=4)),
                        max_leaves=12)


_INTEGERS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTEGERS:
        low, high = _INTEGERS[kind]
        edges = [low, high, 0, -1 if low < 0 else 1]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if kind == FieldDescriptor.TYPE_ENUM:  # open enums: any int32, known or not
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    return texts()


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> message.Message:
    """A message of `descriptor` with some of its fields set, at random."""
    built = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name == "google.protobuf.Struct":
        built.update(draw(st.dictionaries(texts(), json_values(), max_size=4)))  # type: ignore[attr-defined]
        return built
    if descriptor.full_name == "google.protobuf.Value":
        built.MergeFrom(_value(draw(json_values())))
        return built
    for field in descriptor.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        repeated = field.is_repeated
        count = draw(st.integers(1, 3)) if repeated else 1
        for _ in range(count):
            _set(draw, built, field, depth, repeated)
    return built


def _set(draw: st.DrawFn, built: message.Message, field: FieldDescriptor, depth: int, repeated: bool) -> None:
    target = getattr(built, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        key = draw(scalars(key_field))
        if value_field.message_type is not None:
            target[key].MergeFrom(draw(messages(value_field.message_type, depth + 1)))
        else:
            target[key] = draw(scalars(value_field))
    elif field.message_type is not None:
        value = draw(messages(field.message_type, depth + 1))
        (target.add() if repeated else target).MergeFrom(value)
    elif repeated:
        target.append(draw(scalars(field)))
    else:
        setattr(built, field.name, draw(scalars(field)))


def _value(value: Any) -> message.Message:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few bytes flipped, cut short, or garbage inserted."""
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and data:
            position = min(position, len(data) - 1)
            data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
        elif how == "cut":
            data = data[:position]
        else:
            data = data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:]
    return data


@st.composite
def payloads(draw: st.DrawFn, method: Method) -> bytes:
    """Random bytes, or a request message built at random, as it is or mutated."""
    how = draw(st.sampled_from(["random", "built", "mutated"]))
    if how == "random":
        return draw(st.binary(max_size=256))
    data = draw(messages(method.descriptor.input_type)).SerializeToString()
    return data if how == "built" else draw(mutated(data))


# --- calling ---------------------------------------------------------------------------------------------------

def call(channel: grpc.Channel, method: Method, data: bytes) -> grpc.StatusCode:
    """Send `data` as the request: a unary call is awaited, a stream read for two messages and cancelled."""
    descriptor = method.descriptor
    stream: Any
    try:
        if descriptor.client_streaming:
            bidi: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method.path)
            stream = bidi(iter([data]), timeout=STREAM_DEADLINE)
        elif descriptor.server_streaming:
            server_streaming: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method.path)
            stream = server_streaming(data, timeout=STREAM_DEADLINE)
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method.path)
            unary(data, timeout=CALL_DEADLINE)
            return grpc.StatusCode.OK
        for received, _ in enumerate(stream, start=1):
            if received == 2:
                break
        stream.cancel()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def fuzz(channel: grpc.Channel, method: Method) -> Callable[[], None]:
    """The bounded hypothesis run of one method."""

    @settings(max_examples=EXAMPLES_PER_METHOD, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payloads(method))
    def answers_properly(data: bytes) -> None:
        code = call(channel, method, data)
        assert code not in NEVER, (method.path, code, data[:200])

    return answers_properly


def test_every_rpc_answers_random_and_mutated_requests_properly(fuzzed: Fuzzed) -> None:
    for method in fuzzed.methods:
        fuzz(fuzzed.channels[method.address], method)()
