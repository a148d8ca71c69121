"""A minimal cleartext HTTP/2 client (prior knowledge) on the `h2` library, for tests.

httpx sends a request's whole body before it reads the response, so it cannot send a
body only after the response headers arrived; gRPC needs trailers and exact control of
the bytes (broken envelopes). This client does both, several streams on one connection.
Every wait is bounded by `patience` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

Headers = list[tuple[str, str]]


@dataclass
class Stream:
    """What the server answered on one stream so far."""

    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)
    reset: int | None = None
    got_headers: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> int:
        return int(dict(self.headers)[":status"])

    def header(self, name: str) -> str | None:
        """`name` from the trailers, else the headers (gRPC "trailers-only" answers)."""
        for source in (self.trailers, self.headers):
            for key, value in source:
                if key == name:
                    return value
        return None

    @property
    def grpc_status(self) -> int | None:
        value = self.header("grpc-status")
        return int(value) if value is not None else None

    @property
    def grpc_message(self) -> str:
        return unquote(self.header("grpc-message") or "")


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 authority: str, patience: float) -> None:
        self._reader = reader
        self._writer = writer
        self._authority = authority
        self.timeout = patience
        self._conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._streams: dict[int, Stream] = {}
        self._window = asyncio.Event()
        self.closed = asyncio.Event()
        # The server's GOAWAY frames: (error code, last stream id).
        self.goaways: list[tuple[int, int]] = []
        self.disconnected = asyncio.Event()  # the server closed the socket (or reading failed)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, host: str, port: int, patience: float = 10.0) -> AsyncIterator[H2Client]:
        """A connection to HOST:PORT; every later wait on it gives up after `patience` s."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), patience)
        client = cls(reader, writer, f"{host}:{port}", patience)
        client._conn.initiate_connection()
        await client._flush()
        client._task = asyncio.create_task(client._read_loop())
        try:
            yield client
        finally:
            client._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client._task
            writer.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.wait_closed(), patience)

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for event in self._conn.receive_data(data):
                    self._handle(event)
                await self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.disconnected.set()
            self.closed.set()
            self._window.set()
            for stream in self._streams.values():
                stream.got_headers.set()
                stream.ended.set()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = _text(event.headers)
            stream.got_headers.set()
        elif isinstance(event, h2.events.DataReceived):
            if stream is not None:
                stream.body.extend(event.data)
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = _text(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.got_headers.set()
            stream.ended.set()
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = event.error_code
            stream.got_headers.set()
            stream.ended.set()
            self._window.set()  # a sender waiting for window on it stops
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaways.append((int(event.error_code or 0), int(event.last_stream_id or 0)))
            self.closed.set()

    async def start(self, path: str, headers: Sequence[tuple[str, str]] = (),
                    method: str = "POST") -> int:
        """Send a request's headers (no END_STREAM); returns the stream id."""
        stream_id = self._conn.get_next_available_stream_id()
        self._streams[stream_id] = Stream()
        self._conn.send_headers(stream_id, [
            (":method", method), (":scheme", "http"), (":authority", self._authority),
            (":path", path), *headers,
        ])
        await self._flush()
        return stream_id

    async def send(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Send `data` on the stream, honouring flow control; then END_STREAM if `end`.
        Stops early (as real clients do) when the server resets the stream."""
        view = memoryview(data)
        stream = self._streams[stream_id]
        async with asyncio.timeout(self.timeout):
            while view:
                if stream.reset is not None or self.closed.is_set():
                    return
                window = min(self._conn.local_flow_control_window(stream_id),
                             self._conn.max_outbound_frame_size)
                if window <= 0:
                    self._window.clear()
                    await self._window.wait()
                    continue
                self._conn.send_data(stream_id, view[:window].tobytes())
                view = view[window:]
                await self._flush()
            if end:
                self._conn.end_stream(stream_id)
                await self._flush()

    async def headers(self, stream_id: int) -> Stream:
        stream = self._streams[stream_id]
        await asyncio.wait_for(stream.got_headers.wait(), self.timeout)
        return stream

    async def response(self, stream_id: int) -> Stream:
        stream = self._streams[stream_id]
        await asyncio.wait_for(stream.ended.wait(), self.timeout)
        return stream

    async def request(self, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> Stream:
        """A whole request; the server's whole answer."""
        stream_id = await self.start(path, headers)
        # The server may answer (and close the stream) before it has read everything.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            await self.send(stream_id, body)
        return await self.response(stream_id)


def _text(headers: Sequence[tuple[bytes | str, bytes | str]]) -> Headers:
    return [(_str(k), _str(v)) for k, v in headers]


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
