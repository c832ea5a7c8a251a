"""The baseline for request latency: a bare grpc.aio server with only grpc.health.v1.

`python -m bench.bare_unary` serves the standard health service (the textbook
aio HealthServicer, nothing else: no reflection, no options, no storage) on
an ephemeral loopback port and prints `bare unary listening on HOST:PORT`. A
Check round trip against it is the floor for any unary call on this machine.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"bare unary listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve())
