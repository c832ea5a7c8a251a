"""The baseline for ingest: a bare grpc.aio server streaming the same StepEvents.

`python -m bench.bare_stream ORCHESTRATOR_DATA_DIR BATCH` loads the events of
an orchestrator log into memory and serves StreamStepEvents with the generated
handler, the textbook way: one StreamStepEventsResponse of BATCH events per
message, built from the messages. No persistence, no feed, no heartbeats.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from stepstream.common.v1 import records_pb2
from stepstream.orchestrator.v1 import orchestrator_service_pb2 as pb

from orchestrator_svc.app import DATABASE_FILE


def stream_handler(events: list[records_pb2.StepEvent], batch: int) -> grpc.GenericRpcHandler:
    async def stream(
        request: pb.StreamStepEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamStepEventsResponse]:
        for start in range(0, len(events), batch):
            chunk = events[start:start + batch]
            yield pb.StreamStepEventsResponse(log_id="bare", batch=pb.StepEventBatch(events=chunk))

    method = grpc.unary_stream_rpc_method_handler(
        stream,
        request_deserializer=pb.StreamStepEventsRequest.FromString,
        response_serializer=pb.StreamStepEventsResponse.SerializeToString,
    )
    service = pb.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
    return grpc.method_handlers_generic_handler(service, {"StreamStepEvents": method})


async def serve(data_dir: str, batch: int) -> None:
    with sqlite3.connect(f"{data_dir}/{DATABASE_FILE}") as db:
        rows = db.execute("SELECT data FROM events ORDER BY seq")
        events = [records_pb2.StepEvent.FromString(row[0]) for row in rows]
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((stream_handler(events, batch),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare stream listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
