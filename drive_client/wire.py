"""The chunk messages of Put and Get, without protobuf copies of the bytes.

`PutRequest.data` and `GetResponse.data` are both field 2 (length-delimited)
of their message. A data message is encoded here as its tag, length and the
bytes (one copy), and decoded to a memoryview of the received buffer (no
copy); every other message goes through protobuf as usual. On the wire
nothing changes: any gRPC client or server, grpcurl included, sees ordinary
messages.

In Python, a chunk is a `bytes`/`memoryview`; any other message is a
protobuf object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from .errors import InvalidArgument
from .pb import drive_pb2 as pb
from .pb import drive_pb2_grpc as pb_grpc

DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited), in PutRequest and GetResponse
SMALL_FILE = 1 << 20  # a file of at most this many bytes travels as one message (PutRequest.file, GetResponse.file)
Chunk = bytes | memoryview
PutMessage = pb.PutRequest | Chunk
GetMessage = pb.GetResponse | Chunk


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _chunk(raw: bytes) -> memoryview | None:
    """The bytes of a data message (a view into `raw`), or None when `raw` is another message."""
    if not raw or raw[0] != DATA_TAG:
        return None
    length = shift = 0
    position = 1
    while position < len(raw) and position < 11:
        byte = raw[position]
        length |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return memoryview(raw)[position:] if position + length == len(raw) else None
        shift += 7
    return None


def _encode(message: Any) -> bytes:
    if isinstance(message, (bytes, memoryview)):
        return b"".join((bytes((DATA_TAG,)), _varint(len(message)), message))
    return message.SerializeToString()


def decode_put_request(raw: bytes) -> PutMessage:
    chunk = _chunk(raw)
    return pb.PutRequest.FromString(raw) if chunk is None else chunk


def decode_get_response(raw: bytes) -> GetMessage:
    chunk = _chunk(raw)
    return pb.GetResponse.FromString(raw) if chunk is None else chunk


def chunk_of(message: PutMessage | GetMessage) -> Chunk | None:
    """The bytes of a data message, whichever way it was decoded; None for any other message."""
    if isinstance(message, (bytes, memoryview)):
        return message
    return message.data if message.WhichOneof("message") == "data" else None


encode_put_request = _encode
encode_get_response = _encode


def fast_stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.DriveServiceStub:
    """A DriveService stub whose Put sends and whose Get receives chunks as plain bytes."""
    stub = pb_grpc.DriveServiceStub(channel)
    stub.Put = channel.stream_unary(
        "/drive.v1.DriveService/Put", request_serializer=encode_put_request,
        response_deserializer=pb.PutResponse.FromString,
    )
    stub.Get = channel.unary_stream(
        "/drive.v1.DriveService/Get", request_serializer=pb.GetRequest.SerializeToString,
        response_deserializer=decode_get_response,
    )
    return stub


class _Capture:
    """Stands in for a server to take the method handlers generated code registers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the daemon receives in place of a request message that does not decode (bad UTF-8 in a string, a
    corrupt message): its handler refuses it with `error`, once the call is authenticated, and logs and counts the
    refusal. A deserializer that raised would have gRPC answer UNKNOWN itself, naming a Python class, before the
    service sees the call."""

    error: InvalidArgument


def _or_undecodable(decode: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """`decode`, giving an Undecodable for a message of `type_name` that does not decode."""
    prefix = f"Error parsing message with type '{type_name}': "  # protobuf's: our message names the type once

    def decoded(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError as err:
            reason = str(err).removeprefix(prefix)
            return Undecodable(InvalidArgument(f"the request is not a valid {type_name}: {reason}"))

    return decoded


def handing_on_undecodable(handler: grpc.RpcMethodHandler, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    """`handler` of `method`, given an `Undecodable` for a request message that does not decode."""
    return handler._replace(
        request_deserializer=_or_undecodable(handler.request_deserializer, method.input_type.full_name))


def reading_its_request(handler: Any, behavior: Callable[..., Any] | None = None) -> Any:
    """`handler` of a method with one request message, run as one whose client streams: its behavior (or
    `behavior`) is called with the call's request stream as soon as the call starts, and reads the message itself.

    gRPC runs a unary-request handler only once the whole message has come:
    a client that sends part of it and stalls holds up to a message (4 MiB)
    in the daemon for as long as it stalls, before the daemon knows of the
    call (its token, its peer's count of calls). The wire is the same.
    """
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        return handler._replace(request_streaming=True, stream_stream=behavior or handler.unary_stream,
                                unary_stream=None)
    return handler._replace(request_streaming=True, stream_unary=behavior or handler.unary_unary, unary_unary=None)


def method_handlers(add_servicer: Callable[[Any, Any], None], servicer: Any) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers generated code's `add_servicer` registers for `servicer`, by method name."""
    capture = _Capture()
    add_servicer(servicer, capture)
    return dict(capture.handlers)


def add_fast_servicer(servicer: pb_grpc.DriveServiceServicer, server: grpc.aio.Server) -> None:
    """Registers `servicer` like the generated code does, with Put and Get chunks as plain bytes, requests that do
    not decode handed to it as `Undecodable`, and each call's request read by the servicer (`reading_its_request`)."""
    handlers = method_handlers(pb_grpc.add_DriveServiceServicer_to_server, servicer)
    handlers["Put"] = handlers["Put"]._replace(request_deserializer=decode_put_request)
    handlers["Get"] = handlers["Get"]._replace(response_serializer=encode_get_response)
    service = pb.DESCRIPTOR.services_by_name["DriveService"]
    for method, handler in handlers.items():
        handlers[method] = handing_on_undecodable(reading_its_request(handler), service.methods_by_name[method])
    add_handlers(server, service.full_name, handlers)


def add_handlers(server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Serves `handlers`, the methods of `service`, as generated code registers them."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
