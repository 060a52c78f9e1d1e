"""Wiring: the grpc.aio server with the drive service, health, reflection and signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from drive_client.channels import Connection, is_loopback, open_channel
from drive_client.errors import Unavailable
from drive_client.malloc import release_free_memory
from drive_client.pb import drive_pb2 as pb
from drive_client.uri import parse_drive
from drive_client.wire import add_fast_servicer, add_handlers, method_handlers

from . import logs, metrics
from .auth import Access, TokenFileError
from .backends.base import Backend
from .backends.local import DataDirError, LocalBackend
from .config import MESSAGE_LIMIT, Config
from .coordinator import Coordinator
from .descriptors import Descriptors
from .drives import DriveRouter
from .events import InProcessCoordinator
from .handoff import Handoffs
from .limits import Streams
from .managed import ManagedDrives
from .s3drives import S3Drives
from .s3index.mounts import S3Mounts
from .service import DriveService, reading_as_drive_service
from .tls import ServerTLS, TLSFileError
from .uploads import HeldUploads

log = logging.getLogger("drived")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DriveService"].full_name
# Disk and hashing work runs in threads; puts and gets of many files at once each need one.
WORKER_THREADS = 32
CONNECTION_IDLE = 600.0  # seconds
HANDSHAKE_TIMEOUT = 20.0  # seconds
CALLS_PER_CONNECTION = 1000  # the most calls one client connection has in the daemon at once
CLIENT_PING_INTERVAL = 5.0  # seconds: the shortest a client's pings may come on a connection carrying nothing
KEEPALIVE_TIME = 20.0  # seconds between the pings the daemon sends a client while it has calls open
KEEPALIVE_TIMEOUT = 10.0  # seconds it waits for the ping's answer before it closes the connection
# The seconds the stop waits, once no call is left to serve, for S3 to answer what the daemon still asks (with
# --storage, a commit under way, the aborts of held uploads; a mount's listing); and, after a second signal, for
# the rest of the stop, a data dir's changes under way included: deploy/k8s kills a pod 10 s after the grace period.
CLOSE_SECONDS = 5.0


class Health(health.aio.HealthServicer):
    """The health service, whose Watch streams end UNAVAILABLE once the drain's transfers have ended (`drained`):
    gRPC's client-side health checking keeps one open to each server, and such a stream, which takes no place among
    the streams, held the server's stop for the whole grace period after it had told NOT_SERVING."""

    def __init__(self) -> None:
        super().__init__()
        self._drained = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        drained = asyncio.ensure_future(self._drained.wait())
        try:
            done, _ = await asyncio.wait([watching, drained], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            drained.cancel()
        if watching in done:  # a write to a client that went away failed
            return watching.result()
        ended = Unavailable("shutting down: watch again (on another replica, or here once it is back)")
        await context.abort(ended.status, ended.details())

    def drained(self) -> None:
        self._drained.set()


def make_backend(config: Config, descriptors: Descriptors) -> Backend:
    """The backend of managed drives: the data dir, or the S3 location of --storage."""
    if config.storage:
        from .backends.s3 import S3Backend  # boto3 loads only with --storage: a data dir's daemon starts faster

        where = parse_drive(config.storage)
        return S3Backend(where.bucket, where.prefix, config.chunk_size, config.upload_expiry,
                         config.stream_idle_timeout, config.named)
    try:
        return LocalBackend(config.data_dir, descriptors, config.chunk_size,
                            f"{config.named('data_dir')} {config.data_dir}")
    except DataDirError as err:
        raise SystemExit(f"drived: {config.named('data_dir')} {config.data_dir}: {err}") from None


def make_coordinator(config: Config) -> Coordinator:
    """The coordinator of managed drives: in-process, or the Redis/Valkey of --coordinator."""
    if config.coordinator:
        from .redis_coordinator import RedisCoordinator  # redis loads only with --coordinator

        return RedisCoordinator(config.coordinator, config.claim_ttl, upload_expiry=config.upload_expiry,
                                named=config.named)
    return InProcessCoordinator()


def server_options(config: Config, connections: int) -> list[tuple[str, int]]:
    options = [
        ("grpc.so_reuseport", 0),  # a taken port must fail loudly
        # Each connection holds a descriptor, and gRPC would accept them until the process had none left for
        # files: past `connections` it closes a new one at once. So that connections nobody uses cannot fill
        # that room for good (a client host that vanished never closes its own; the daemon pings only
        # connections with calls open), one without calls is closed after CONNECTION_IDLE (its client
        # reconnects at its next call), and one that has not finished its handshake (TLS, HTTP/2's
        # preface) after HANDSHAKE_TIMEOUT.
        ("grpc.max_allowed_incoming_connections", connections),
        ("grpc.max_connection_idle_ms", int(CONNECTION_IDLE * 1000)),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT * 1000)),
        # gRPC queues the calls the daemon has yet to take up and cancels those past some 1,000, whoever sent
        # them: a connection that opens calls and resets them at once, as fast as it can (HTTP/2 rapid reset),
        # would fill that queue with calls nobody waits for, and every other client's calls would be cancelled.
        # So a call holds its connection's place until the daemon has ended it, reset or not (gRPC's overload
        # protection), and past CALLS_PER_CONNECTION gRPC refuses a new one at once (REFUSED_STREAM: the client
        # sees UNAVAILABLE, nothing was done).
        ("grpc.max_concurrent_streams", CALLS_PER_CONNECTION),
        ("grpc.http.overload_protection", 1),
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        ("grpc.max_send_message_length", MESSAGE_LIMIT),
        # A fixed receive window per stream, as in the client (drive_client.common):
        # BDP-grown windows let a long put's buffered bytes, and the daemon's memory, vary.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 2 << 20),
        # Clients ping every 10 s while they have calls open, to find a daemon that stopped answering
        # (drive_client.channels); gRPC's default would take pings more often than every 5 min, on a
        # connection carrying nothing, as abuse and end the connection (GOAWAY too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", int(CLIENT_PING_INTERVAL * 1000)),
        # And the daemon pings its clients while they have calls open: the connection of one that stopped
        # answering (a stopped or frozen process, a network black hole) is closed within 30 s, and what its
        # calls held (a List's answer room, a request's bytes received so far) comes back. gRPC waits a
        # minute for a ping's answer unless `ping_timeout_ms` says otherwise.
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if config.max_connection_age:
        # GOAWAY after this age: clients reconnect, re-resolving dns:/// names; calls in progress go on.
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)))
    return options


def make_access(config: Config) -> Access:
    """The tokens calls need (`--token`, `--auth-tokens`); none when neither is set."""
    try:
        return Access(config.auth_tokens, config.token, config.named("token"))
    except TokenFileError as err:
        raise SystemExit(f"drived: {config.named('auth_tokens')}: {err}") from None


def make_tls(config: Config) -> ServerTLS | None:
    """The TLS of the gRPC port (`--tls-cert`, `--tls-key`, `--tls-client-ca`); None for plaintext."""
    if not config.tls_cert:
        return None
    try:
        return ServerTLS(config)
    except TLSFileError as err:
        raise SystemExit(f"drived: {err}") from None


def exposure(config: Config, tokens: bool) -> list[str]:
    """What is unprotected when the daemon listens beyond loopback: one sentence a problem."""
    if is_loopback(config.listen):
        return []
    problems = []
    if not tokens and not config.tls_client_ca:
        problems.append("calls need no token: anyone who reaches this address can read, write and delete every "
                        "drive; set --auth-tokens (or --token)")
    if not config.tls_cert:
        problems.append("no TLS: files" + (" and tokens" if tokens else "") + " cross the network unencrypted, "
                        "readable by anyone on the path; set --tls-cert and --tls-key")
    return problems


async def serve(config: Config) -> NoReturn:
    """Runs the daemon until SIGTERM or SIGINT, then drains in-flight calls within the grace period and ends the
    process; a second SIGTERM or SIGINT cancels them at once. Either one during the start-up stops it.

    SIGHUP reads the token file and the TLS files again.
    """
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="drived-io"))
    signals = Signals(loop)
    access = make_access(config)
    tls = make_tls(config)
    problems = exposure(config, access.required)
    if problems:
        log.warning("listening beyond loopback", extra={"fields": {"listen": config.listen, "problems": problems}})
    descriptors = Descriptors.of_this_process()
    connections = config.max_connections or descriptors.for_connections
    server = grpc.aio.server(options=server_options(config, connections))
    backend = make_backend(config, descriptors)
    mounts = S3Mounts(concurrency=config.s3_list_concurrency, page_size=config.s3_page_size,
                      memory=config.s3_index_memory, named=config.named)
    coordinator = make_coordinator(config)
    streams = Streams(
        config.max_streams, config.max_streams_per_peer, config.stream_idle_timeout,
        release_memory=lambda: loop.run_in_executor(None, release_free_memory), named=config.named,
    )
    uploads = HeldUploads(config.upload_expiry, config.max_held_uploads, config.max_held_bytes, coordinator,
                          config.named)
    managed = ManagedDrives(backend, coordinator, uploads, config.max_file_size, config.quota, config.named)
    drives = DriveRouter(managed, S3Drives(mounts, config.chunk_size))
    service = DriveService(drives, streams, access)

    async def closed() -> None:
        # What a call the stop cancelled still changes in the store ends before the uploads, the coordinator and
        # the store close, and before the data dir's lock and clean-stop mark say that no daemon writes there.
        await service.ended()
        service.refusals.close()
        await streams.close()
        await uploads.close()
        await coordinator.disconnect()
        await backend.close()
        if service.handoffs is not None:
            service.handoffs.close()

    signals.at_once = asyncio.ensure_future(_cancelled_at_once(signals, server, streams, service))
    if not await signals.unless_stopped(_started(backend, coordinator)):
        log.info("stopping before serving")
        await _closed_within(closed(), mounts, config, service)
    add_fast_servicer(service, server)
    health_servicer = Health()
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    add_handlers(server, health_service.full_name, reading_as_drive_service(
        health_service, method_handlers(health_pb2_grpc.add_HealthServicer_to_server, health_servicer), streams))
    if config.reflection:
        reflection_service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
        servicer = reflection.aio.ReflectionServicer(
            [SERVICE_NAME, health_service.full_name, reflection_service.full_name])
        add_handlers(server, reflection_service.full_name, reading_as_drive_service(
            reflection_service, method_handlers(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, servicer),
            streams))
    try:
        port = server.add_secure_port(config.listen, tls.credentials()) if tls else server.add_insecure_port(
            config.listen)
    except RuntimeError as err:
        raise SystemExit(f"drived: cannot listen on {config.listen}: {err} (is another daemon using it?)") from None
    handoffs = Handoffs(port, descriptors) if config.handoff and not config.listen.startswith("unix") else None
    if handoffs is not None and handoffs.start():
        service.handoffs = handoffs
    if config.metrics_listen:
        metrics.serve(config.metrics_listen)
    await server.start()
    streams.start()
    settling = asyncio.ensure_future(managed.settle_unpublished())
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    where: dict[str, str | None] = {"storage": config.storage} if config.storage else {"data_dir": config.data_dir}
    if isinstance(backend, LocalBackend):  # its calls on the data dir: in threads only where they can hang
        where["data_dir_fs"] = backend.data_dir_fs
        where["file_calls"] = "threads" if backend.file_calls_in_threads else "inline"
    if config.coordinator:
        from .redis_coordinator import coordinator_name

        where["coordinator"] = coordinator_name(config.coordinator)  # the URL without its password
    security = {"tls": "mutual" if config.tls_client_ca else "on" if tls else "off",
                "tokens": "on" if access.required else "off"}
    handoff = {"handoff": "@" + service.handoffs.name if service.handoffs else "off"}
    log.info("serving", extra={"fields": {
        "listen": config.listen, **where, **security, "max_connections": connections, **handoff}})

    loop.add_signal_handler(signal.SIGHUP, reload, access, tls)
    await signals.stop.wait()
    # The drain is done here, before grpc's server.stop: from the moment that starts, grpc cancels each new call
    # (CANCELLED, which clients do not retry) until the client has read its GOAWAY, and a call sent on a live
    # connection just then was answered CANCELLED instead of UNAVAILABLE. Until the open streams end, the service
    # answers new calls UNAVAILABLE itself; server.stop comes when nothing is left to finish, or at a second signal.
    service.draining = True
    log.info("draining", extra={"fields": {"grace_period_s": config.grace_period, "open_streams": streams.count}})
    deadline = loop.time() + config.grace_period
    await health_servicer.enter_graceful_shutdown()
    settling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await settling
    await coordinator.close()  # watches and waiting gets answer UNAVAILABLE now; transfers get the grace period
    if not await streams.wait_closed(config.grace_period):
        log.warning("grace period over: cancelling what is still open", extra={"fields": {"streams": streams.count}})
    health_servicer.drained()
    await server.stop(max(0.0, deadline - loop.time()))
    await _closed_within(closed(), mounts, config, service)


class Signals:
    """SIGTERM and SIGINT, from the start of `serve` on (before, `drived.cli` ends the process at once): the first
    one stops the daemon (`stop`), a second one asks it to stop at once (`hurry`, `_cancelled_at_once`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.at_once: asyncio.Future[None] | None = None  # the task that awaits `hurry` (held: the loop does not)
        self._starting: asyncio.Task[Any] | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received)

    def _received(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
            return
        self.stop.set()
        if self._starting is not None:
            self._starting.cancel()

    async def unless_stopped(self, starting: Awaitable[None]) -> bool:
        """Awaits the start-up step `starting`, which a stop cancels; False when it did.

        Awaited in the caller's task, not one of its own: a SystemExit that
        ends the start-up (a missing bucket) raised in another task ends the
        loop with that task's failure unread, logged with a traceback.
        """
        self._starting = asyncio.current_task()
        try:
            await starting
        except asyncio.CancelledError:
            if not self.stop.is_set():
                raise
            return False
        finally:
            self._starting = None
        return True


async def _started(backend: Backend, coordinator: Coordinator) -> None:
    await backend.start()
    await coordinator.start()


async def _cancelled_at_once(signals: Signals, server: grpc.aio.Server, streams: Streams, service: DriveService
                             ) -> None:
    """At a second SIGTERM or SIGINT, cancels every call still open, as the grace period's end does, and ends the
    process once the rest of the stop has had CLOSE_SECONDS.

    What a call changes in the store runs to its end within that time, the
    data dir locked until then (`serve`). One that does not end (a data dir
    on a network mount whose server is gone: a thread in a rename or fsync
    that never returns, which nothing can cancel) is abandoned as a kill
    leaves it: a file becomes visible by one rename of its finished upload,
    so its path holds the earlier version or the new one, whole; the
    upload's temporary file goes at the next start, which also looks for
    folders made for it (no clean stop is marked).
    """
    await signals.hurry.wait()
    log.warning("stopping at once: cancelling what is still open", extra={"fields": {
        "streams": streams.count, "calls": len(service.calls)}})
    await server.stop(0)
    await asyncio.sleep(CLOSE_SECONDS)
    log.warning("stopping at once: abandoned what still runs", extra={"fields": {
        "waited_s": CLOSE_SECONDS, "calls": service.running()}})
    log.info("stopped")
    logs.end_process()


async def _closed_within(closing: Coroutine[Any, Any, None], mounts: S3Mounts, config: Config, service: DriveService
                         ) -> NoReturn:
    """Runs `closing` and the close of the s3:// drives' mounts, each for CLOSE_SECONDS at most but a data dir's
    `closing` to its end, then logs 'stopped' and ends the process (`logs.end_process`), whatever its threads still do.

    An S3 endpoint that takes requests and never answers held the stop for
    boto3's tries, 3 of 60 s each a request: with --storage an upload held
    (4 min), a commit under way; a mount's listing. Giving it up leaves
    nothing half made: a commit is one request the store makes whole or
    not at all (a change left unpublished is settled by the replicas), and
    a sweep aborts the multipart uploads not aborted, after
    --upload-expiry. A data dir's changes run to their end, however long:
    its lock is held until then (a second signal bounds that:
    `_cancelled_at_once`).
    """
    tasks = [asyncio.ensure_future(closing), asyncio.ensure_future(mounts.close())]
    if not config.storage:
        await asyncio.wait(tasks[:1])
    _, pending = await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
    if pending:
        given_up: dict[str, object] = {"waited_s": CLOSE_SECONDS, "calls": len(service.calls)}
        if config.storage:
            given_up["left"] = f"a sweep aborts the multipart uploads left, after {config.named('upload_expiry')}"
        log.warning("S3 did not answer: the stop gives up waiting for it", extra={"fields": given_up})
    else:
        for task in tasks:
            task.result()
    log.info("stopped")
    logs.end_process()


def reload(access: Access, tls: ServerTLS | None) -> None:
    """SIGHUP: the token file and the TLS files read again; each keeps what it had when its files are bad."""
    access.reload()
    if tls:
        tls.reload()


async def check_health(connection: Connection, timeout: float) -> str:
    """The serving status of a daemon, by the gRPC health service."""
    async with open_channel(connection, aio=True) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
