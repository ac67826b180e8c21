"""Default addresses and ports, defined once for the server, the edge, `up` and the client."""

from __future__ import annotations

HOST = "127.0.0.1"
GRPC_PORT = 50051
HTTP_PORT = 8000
METRICS_PORT = 9464
GRPC_TARGET = f"{HOST}:{GRPC_PORT}"
DRAIN_GRACE_S = 30.0
