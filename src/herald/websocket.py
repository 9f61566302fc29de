"""The WebSocket protocol uvicorn hands an upgraded connection to (`Config(ws=WebSocket)`): the
ASGI WebSocket interface on websockets' sans-I/O `ServerProtocol`, with as little as possible
kept per connection, since a server holds thousands of idle live streams.

uvicorn's own implementation on the same library (`ws="websockets-sansio"`) keeps, for the life of
every connection, an `asyncio.Queue` (four deques and an Event), a "writable" Event, the
handshake request and response with their headers, and a scope with a copy of every header; the
websockets library's parse generator also keeps the request in its frame. This one keeps the
ServerProtocol, the scope and the app's task: events for the app are in a list only until the
app takes them (a live stream's client sends nothing), it waits for one on a future made then,
the request is dropped once accepted (the parser restarted on an empty buffer), and writing
waits on a future made only while the transport is paused. Same port, same URLs: uvicorn's HTTP
protocol (herald.connections) parses the upgrade request and hands the connection over.

Differences from uvicorn's on purpose: no pings (Herald turns them off: server.py) and no
permessage-deflate (likewise). Log lines are uvicorn's, on its logger, so herald.logs redacts
them the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

# uvicorn's logger, for its lines and the library's ("connection open"), as uvicorn does:
# herald.logs filters it (tokens in query strings).
log = logging.getLogger("uvicorn.error")

CLOSE_TIMEOUT = 10.0  # s for the client to answer our close frame
CONNECTING, ACCEPTED, ANSWERING, CLOSED = range(4)  # `phase`: ANSWERING = an HTTP answer


class WebSocket(asyncio.Protocol):
    """One WebSocket connection and its ASGI application call."""

    __slots__ = (
        "answer",
        "app",
        "app_state",
        "close_sent",
        "closer",
        "config",
        "connections",
        "default_headers",
        "disconnected",
        "drained",
        "fragments",
        "inbox",
        "loop",
        "phase",
        "protocol",
        "response",
        "scope",
        "tasks",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.config = config
        self.default_headers = server_state.default_headers
        self.app_state = app_state
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.protocol = ServerProtocol(max_size=config.ws_max_size, logger=log)
        self.phase = CONNECTING
        self.close_sent = False  # our close frame (or HTTP answer) is out
        self.disconnected = False  # the transport is gone
        self.scope: dict[str, Any] | None = None
        self.response: Response | None = None  # the 101 until the app accepts
        self.answer: tuple[int, list[tuple[str, str]], bytes] | None = None  # an HTTP answer
        # ASGI receive: events the app has not taken yet (a list only while there are some:
        # reading pauses meanwhile), and the future the app waits on for the next one.
        self.inbox: list[dict[str, Any]] | None = None
        self.fragments: list[bytes] | None = None  # of a fragmented message, first frame first
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None  # while the transport is paused
        self.closer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # uvicorn's set is typed for its own protocols; it only calls shutdown() on them.
        self.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        accepted = self.phase == ACCEPTED and self.answer is None
        self.push({"type": "websocket.disconnect", "code": 1005 if accepted else 1006})
        self.disconnected = True
        if self.phase == CONNECTING:
            self.phase = CLOSED
        self.wake_writer()
        if self.closer is not None:
            self.closer.cancel()
            self.closer = None
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self.wake_writer()

    def wake_writer(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        if protocol.parser_exc is not None:
            self.failed()
            return
        if protocol.handshake_exc is not None and self.scope is None:
            self.unreadable()
            return
        for event in protocol.events_received():
            if isinstance(event, Request):
                self.connect(event)
            elif isinstance(event, Frame):
                self.frame(event)
        self.flush()

    def flush(self) -> None:
        # Not `data_to_send()`: it swaps in a new list on every call, which the protocol then
        # keeps. One long-lived young object per message sent: at 2,000 messages/s each
        # young-generation collection walked thousands of them (2-5 ms pauses, and more for the
        # next generation). The same list is emptied instead. (`writes` is where websockets'
        # sans-I/O protocol queues its output; data_to_send returns it.)
        out = self.protocol.writes
        if not out:
            return
        data = b"".join(out)
        out.clear()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def shutdown(self) -> None:
        """uvicorn's shutdown, for a connection still open after Herald closed its streams."""
        if self.close_sent:
            if self.closer is not None:
                self.closer.cancel()
                self.closer = None
            self.transport.close()
            return
        if self.phase == ACCEPTED and self.answer is None:
            self.push({"type": "websocket.disconnect", "code": 1012})
            self.protocol.send_close(1012)
            self.flush()
        else:
            self.reject_500()
        self.transport.close()

    # -- incoming -------------------------------------------------------------------------------
    def connect(self, request: Request) -> None:
        config = self.config
        response = self.protocol.accept(request)
        if response.status_code != 101:  # not a valid WebSocket handshake
            self.phase = CLOSED
            self.close_sent = True
            self.protocol.send_response(response)
            self.flush()
            self.transport.close()
            return
        self.response = response
        raw_path, _, query = request.path.partition("?")
        headers = [
            (key.encode("ascii"), value.encode("latin-1"))
            for key, value in request.headers.raw_items()
        ]
        subprotocols = [
            token.strip()
            for header in request.headers.get_all("Sec-WebSocket-Protocol")
            for token in header.split(",")
        ]
        transport = self.transport
        root = config.root_path
        self.scope = {
            "type": "websocket",
            "asgi": {"version": config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(transport) else "ws",
            "server": get_local_addr(transport),
            "client": get_remote_addr(transport),
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": root.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self.push({"type": "websocket.connect"})
        task = self.loop.create_task(self.run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            if self.close_sent:
                return  # past our close: drop it, keep reading until the client's close
            if opcode is not Opcode.CONT:
                self.fragments = [opcode.name.encode()]  # the message's kind, then its data
            if self.fragments is None:
                return  # the protocol refuses a continuation without a start
            self.fragments.append(bytes(frame.data))
            if frame.fin:
                self.message(self.fragments)
                self.fragments = None
        elif opcode is Opcode.CLOSE:
            self.closed_by_client()
        # PING: the protocol queued the PONG (flushed by data_received); PONG: we send no pings.

    def message(self, fragments: list[bytes]) -> None:
        data = b"".join(fragments[1:])
        if fragments[0] == b"BINARY":
            self.push({"type": "websocket.receive", "bytes": data})
        else:
            try:
                self.push({"type": "websocket.receive", "text": data.decode()})
            except UnicodeDecodeError:
                self.protocol.fail(1007)
                self.failed()
                return
        self.transport.pause_reading()  # until the app takes it (uvicorn's flow control)

    def closed_by_client(self) -> None:
        if self.close_sent:  # the client answered our close: the closing handshake is done
            if self.closer is not None:
                self.closer.cancel()
                self.closer = None
                self.transport.close()
            return
        if not self.transport.is_closing():
            close = self.protocol.close_rcvd
            code, reason = (close.code, close.reason) if close else (1005, "")
            self.push({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.flush()  # the protocol's answering close frame
            self.transport.close()

    def failed(self) -> None:
        """The client broke the protocol: the protocol queued a close frame; send it, end."""
        close = self.protocol.close_sent
        code, reason = (close.code, close.reason) if close else (1006, "")
        self.push({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.close_sent = True
        self.flush()
        self.transport.close()

    def unreadable(self) -> None:
        """Not a readable handshake request: answer 400 (or the protocol's 414/431)."""
        self.phase = CLOSED
        self.close_sent = True
        out = b"".join(self.protocol.data_to_send())
        if not out:
            text = "Failed to open a WebSocket connection: invalid request.\n"
            out = self.protocol.reject(400, text).serialize()
        self.transport.write(out)
        self.transport.close()

    def push(self, event: dict[str, Any]) -> None:
        if self.inbox is None:
            self.inbox = [event]
        else:
            self.inbox.append(event)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the application ------------------------------------------------------------------------
    async def run(self) -> None:
        scope = self.scope
        assert scope is not None
        try:
            result = await self.app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("Exception in ASGI application\n")
            self.reject_500()
        else:
            if self.phase == CONNECTING:
                log.error("ASGI callable returned without completing handshake.")
                self.reject_500()
            elif result is not None:
                log.error("ASGI callable should return None, but returned '%s'.", result)
        if self.closer is None:
            self.transport.close()

    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            self.waiter = self.loop.create_future()
            await self.waiter
        event = self.inbox.pop(0)
        if not self.inbox:
            self.inbox = None  # an idle stream keeps no list
            if not self.disconnected:
                self.transport.resume_reading()
        return event

    async def send(self, message: dict[str, Any]) -> None:
        if self.drained is not None and not self.disconnected:
            await asyncio.shield(self.drained)
        if self.disconnected:
            raise ClientDisconnected()
        kind = message["type"]
        if self.phase == CONNECTING:
            self.handshake(message, kind)
        elif self.phase == ANSWERING:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"Expected 'websocket.http.response.body' but got '{kind}'.")
            self.http_body(message)
        elif self.close_sent:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}', after sending 'websocket.close'."
            )
        elif kind == "websocket.send":
            try:
                data = message.get("bytes")
                if data is not None:
                    self.protocol.send_binary(data)
                else:
                    self.protocol.send_text(message["text"].encode())
            except InvalidState as exc:
                raise ClientDisconnected() from exc
            self.flush()
        elif kind == "websocket.close":
            self.close(message.get("code", 1000), message.get("reason") or "")
        else:
            raise RuntimeError(
                f"Expected ASGI message 'websocket.send' or 'websocket.close', but got '{kind}'."
            )

    def handshake(self, message: dict[str, Any], kind: str) -> None:
        scope, response = self.scope, self.response
        assert scope is not None and response is not None
        if kind == "websocket.accept":
            log.info(
                '%s - "WebSocket %s" [accepted]',
                *_where(scope),
            )
            extra = [*self.default_headers, *message.get("headers", [])]
            del response.headers["Date"]
            response.headers.update(
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in extra
            )
            if message.get("subprotocol"):
                response.headers["Sec-WebSocket-Protocol"] = message["subprotocol"]
            if self.transport.is_closing():
                return
            self.phase = ACCEPTED
            self.response = None
            self.protocol.send_response(response)
            self.flush()
            self.forget_request()
        elif kind == "websocket.close":
            log.info(
                '%s - "WebSocket %s" 403',
                *_where(scope),
            )
            self.push({"type": "websocket.disconnect", "code": 1006})
            self.phase = CLOSED
            self.close_sent = True
            self.protocol.send_response(self.protocol.reject(HTTPStatus.FORBIDDEN, ""))
            self.flush()
            self.transport.close()
        elif kind == "websocket.http.response.start":
            status = message["status"]
            if not 100 <= status < 600:
                raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
            log.info(
                '%s - "WebSocket %s" %d',
                *_where(scope),
                status,
            )
            headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
            ]
            self.answer = (status, headers, b"")
            self.phase = ANSWERING
            self.response = None
        else:
            raise RuntimeError(
                "Expected ASGI message 'websocket.accept', 'websocket.close' or "
                f"'websocket.http.response.start' but got '{kind}'."
            )

    def http_body(self, message: dict[str, Any]) -> None:
        assert self.answer is not None
        status, headers, body = self.answer
        body += message.get("body", b"")
        self.answer = (status, headers, body)
        if message.get("more_body", False):
            return
        fields = Headers(headers)
        fields.setdefault("Date", email.utils.formatdate(usegmt=True))
        fields.setdefault("Connection", "close")
        fields.setdefault("Content-Length", str(len(body)))
        fields.setdefault("Content-Type", "text/plain; charset=utf-8")
        phrase = _phrase(status)
        self.push({"type": "websocket.disconnect", "code": 1006})
        self.close_sent = True
        self.protocol.send_response(Response(status, phrase, fields, body))
        self.flush()
        self.transport.close()

    def close(self, code: int, reason: str) -> None:
        if self.transport.is_closing():
            return
        self.push({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.protocol.send_close(code, reason)
        self.flush()
        self.close_sent = True
        self.closer = self.loop.call_later(CLOSE_TIMEOUT, self.transport.close)

    def reject_500(self) -> None:
        if self.phase != CONNECTING or self.answer is not None:
            return
        self.phase = CLOSED
        self.protocol.send_response(self.protocol.reject(500, "Internal Server Error"))
        self.flush()

    def forget_request(self) -> None:
        """Drop the handshake request, which websockets' parse generator keeps in its frame for
        the connection's life (with every header, a bearer token among them): once the request
        is read and the buffer empty, a fresh parser for the OPEN state takes over."""
        protocol = self.protocol
        if protocol.state is OPEN and not protocol.reader.buffer:
            protocol.parser = protocol.parse()
            next(protocol.parser)


def _where(scope: dict[str, Any]) -> tuple[str, str]:
    """The client's address and the path with its query, for uvicorn's log lines."""
    www = cast(Any, scope)
    return get_client_addr(www), get_path_with_query_string(www)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
