"""The baseline for serving output: a bare grpc.aio server streaming the same lines.

`python -m bench.bare_output LINES` serves OrchestratorService.StreamOutput
with the generated handler, the textbook way: every call gets LINES
OutputLines (the shape bench/logs.py's children print, ~50 bytes each, held
in memory), 500 to a StreamOutputResponse built from the messages, then an
OutputEnd. No store, no files, no validation, no flow-control hand-over:
what the transport and the reader alone cost on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from stepstream.common.v1 import states_pb2 as s
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

PER_MESSAGE = 500


def output_handler(lines: list[pb.OutputLine]) -> grpc.GenericRpcHandler:
    async def stream(
        request: pb.StreamOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamOutputResponse]:
        yield pb.StreamOutputResponse(start=pb.OutputStart(attempt=1, lines=len(lines)))
        for start in range(0, len(lines), PER_MESSAGE):
            yield pb.StreamOutputResponse(chunk=pb.OutputChunk(lines=lines[start:start + PER_MESSAGE]))
        yield pb.StreamOutputResponse(end=pb.OutputEnd(finished=True, state=s.STEP_STATE_COMPLETED,
                                                       lines=len(lines)))

    method = grpc.unary_stream_rpc_method_handler(
        stream,
        request_deserializer=pb.StreamOutputRequest.FromString,
        response_serializer=pb.StreamOutputResponse.SerializeToString,
    )
    service = pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
    return grpc.method_handlers_generic_handler(service, {"StreamOutput": method})


async def serve(count: int) -> None:
    now = Timestamp()
    now.FromNanoseconds(time.time_ns())
    lines = [pb.OutputLine(number=n, stream=pb.OUTPUT_STREAM_STDOUT, time=now,
                           data=f"child 0 line {n:06d} the quick brown fox jumps over".encode())
             for n in range(count)]
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((output_handler(lines),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare output listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
