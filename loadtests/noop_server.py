"""A do-nothing ``envoy.service.auth.v3.Authorization`` server: every Check answers OK at once.

The benchmark's Python framework floor: the same grpc.aio stack and event loop as
``authz-server serve`` (uvloop when installed), none of the policy or JWT work. Whatever this
costs per Check is the serving machinery's share of the real server's cost.

    python -m loadtests.noop_server --listen 127.0.0.1:9100
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Sequence

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

_OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Allows everything with one preallocated response."""

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return _OK


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    try:
        import uvloop  # the event loop authz-server itself uses when installed
    except ImportError:
        asyncio.run(serve(args.listen))
    else:
        uvloop.run(serve(args.listen))


if __name__ == "__main__":
    main()
