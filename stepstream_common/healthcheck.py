"""`python -m stepstream_common.healthcheck HOST:PORT [SERVICE]`: exit 0 if SERVING.

For container health checks where no gRPC probe is built in (docker compose);
Kubernetes uses its native gRPC probe against the same grpc.health.v1 service.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}", file=sys.stderr)
            return False
    serving: bool = response.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr)
    return serving


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m stepstream_common.healthcheck HOST:PORT [SERVICE]")
    address, service = sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else ""
    sys.exit(0 if check(address, service) else 1)


if __name__ == "__main__":
    main()
