"""Bearer-token check for DriveService calls (`--token`); health and reflection stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

SERVICE_PREFIX = "/drive.v1.DriveService/"
BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "drived wants a token: pass Drive(..., token=...) (sent as `authorization: Bearer TOKEN`)",
    )


class TokenAuth(grpc.aio.ServerInterceptor):
    """Lets a DriveService call through only with `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected):
            return handler
        behaviour = next(name for name in BEHAVIOURS if getattr(handler, name) is not None)
        return handler._replace(**{behaviour: _refuse})
