"""`python -m stepstream_common.healthcheck HOST:PORT [SERVICE]`: exit 0 if SERVING.

For container health checks where no gRPC probe is built in (docker compose);
Kubernetes uses its native gRPC probe against the same grpc.health.v1 service.

A service that serves TLS is probed with TLS: the probe takes the CLI's TLS
flags and their environment twins (--tls-ca / STEPSTREAM_TLS_CA and so on, see
stepstream.channel.add_tls_arguments), so the CA set in the container's
environment is all it needs; --tls-server-name when the certificate does not
name the address probed (127.0.0.1), and under mTLS a client certificate
(--tls-cert/--tls-key). Kubernetes' native gRPC probe speaks no TLS: probe such
a service with an exec probe running this module instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stepstream.channel import ClientTLS, add_tls_arguments, open_channel, tls_from_arguments
from stepstream.flags import host_port

# Seconds the probe waits for the answer: well within the probes' own timeouts in deploy/.
ANSWER_WITHIN = 3.0


async def check(address: str, service: str = "", tls: ClientTLS | None = None) -> bool:
    """Whether `service` ("" for the server as a whole) at `address` answers SERVING; else why not, on stderr."""
    async with open_channel(address, tls=tls) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=ANSWER_WITHIN
            )
        except grpc.aio.AioRpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr)
    return serving


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stepstream_common.healthcheck",
                                     description="Exit 0 if the service at HOST:PORT answers SERVING, else 1.")
    parser.add_argument("address", metavar="HOST:PORT", type=host_port)
    parser.add_argument("service", nargs="?", default="", help="a service's full name (default: the whole server)")
    add_tls_arguments(parser)
    args = parser.parse_args()
    sys.exit(0 if asyncio.run(check(args.address, args.service, tls=tls_from_arguments(parser, args))) else 1)


if __name__ == "__main__":
    main()
