"""uvicorn's httptools protocol with a leaner answer writer, for the gateway process (``comptoir.serve``).

Every answer the gateway writes carries about twenty headers (the upstream's, the security headers, the rate
limits), and uvicorn's writer checks each name and each value with its own regular expression, then writes the
status line and headers in one ``write`` and the body in another: two system calls for one small answer.
This writer makes the same checks with one search over all the names and one over all the values (the
names are joined by ``-`` and the values by a tab, characters each check allows, so a search finds a
forbidden byte exactly when one of the separate searches would), and holds the head until the body's first
message so that both leave in one ``write``. A head whose body does not follow at once (a streamed answer
still waiting for its first chunk) is written at the end of the event loop's current turn.

Everything else is uvicorn's own: the request parsing, flow control, keep-alive, pipelining and the
answers it checks (Content-Length against the body, chunked encoding, ``HEAD``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import structlog
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from common.errors import PROBLEM_CONTENT_TYPE, problem_body
from common.middleware import new_request_id, security_headers

log = structlog.get_logger("comptoir.gateway")


class GatewayCycle(RequestResponseCycle):
    """One request's answer: ``send`` as uvicorn's, the head written together with the body."""

    _head: bytes | None = None
    _loop: asyncio.AbstractEventLoop

    def _flush_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self.disconnected and not self.transport.is_closing():
                self.transport.write(head)

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
            self.response_started = True
            self.waiting_for_100_continue = False
            status_code = message["status"]
            headers = self.default_headers + list(message.get("headers", []))
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status_code,
                )
            if HEADER_RE.search(b"-".join([name for name, _ in headers])):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(b"\t".join([value for _, value in headers])):
                raise RuntimeError("Invalid HTTP header value.")
            content = [STATUS_LINE[status_code]]
            has_connection_close = False
            for name, value in headers:
                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    if b"close" in [token.lower().strip() for token in value.split(b",")]:
                        self.keep_alive = False
                        has_connection_close = True
                content += (name, b": ", value, b"\r\n")
            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")
            if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            self._head = b"".join(content)
            # Written with the body's first message, or at the end of this turn of the loop if none comes.
            self._loop.call_soon(self._flush_head)
            return
        if self.response_complete:
            return
        if message["type"] != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(head + data)
        elif data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


# What a request the HTTP parser refuses is answered with, besides the problem document: the headers every
# answer carries (HSTS aside: the protocol knows no settings; the TLS terminator in front adds it).
_REFUSED_HEADERS = [*security_headers(hsts_seconds=None), (b"cache-control", b"no-store")]


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, each request answered through a ``GatewayCycle``, with deadlines
    uvicorn does not have (slowloris): a request's line and headers must arrive within ``header_timeout``
    of the connection opening, of the request's first byte, or of any byte sent between requests; its
    body may not pause for longer than ``body_idle_timeout`` nor take more than ``body_timeout`` in all.
    Time the gateway itself is not reading (a pipelined request waiting behind the one being answered)
    does not count. Without them a client that trickled a byte now and then held its connection, and a
    file descriptor, for ever."""

    header_timeout = 10.0
    body_idle_timeout = 10.0
    body_timeout = 120.0
    _slow_timer: asyncio.TimerHandle | None = None
    _in_message = False
    _body_due = 0.0

    def _arm(self, seconds: float, what: str) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
        self._slow_timer = self.loop.call_later(seconds, self._too_slow, what)

    def _disarm(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None

    def _arm_body(self) -> None:
        self._arm(max(0.0, min(self.body_idle_timeout, self._body_due - self.loop.time())), "body")

    def _too_slow(self, what: str) -> None:
        self._slow_timer = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            # Not the client's delay: the gateway has stopped reading until the answer ahead is sent.
            self._body_due += self.body_idle_timeout
            self._arm(self.body_idle_timeout, what)
            return
        log.info("gateway.client.too_slow", waiting_for=what)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_message and self._slow_timer is None:
            # Bytes between requests (a blank line, the start of the next one): the next request's
            # headers are due from now, whatever the parser makes of them.
            self._arm(self.header_timeout, "headers")
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._arm(self.header_timeout, "headers")

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """A request that is not HTTP/1.1 the parser can read (a bad method, raw bytes in the target, both
        Content-Length and Transfer-Encoding, ...): 400 as ``application/problem+json``, like every other
        error, not uvicorn's plain text; the parser's message stays in the log, and the connection closes."""
        request_id = new_request_id()
        body = json.dumps(
            problem_body(400, detail="The request is not valid HTTP/1.1.", request_id=request_id),
            separators=(",", ":"),
        ).encode()
        headers = [
            *self.server_state.default_headers,
            *_REFUSED_HEADERS,
            (b"x-request-id", request_id.encode("ascii")),
            (b"content-type", PROBLEM_CONTENT_TYPE.encode("ascii")),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        log.info("gateway.request.unparsable", reason=msg, request_id=request_id)
        content = [STATUS_LINE[400], *(name + b": " + value + b"\r\n" for name, value in headers), b"\r\n", body]
        self.transport.write(b"".join(content))
        self.transport.close()

    def on_headers_complete(self) -> None:
        # The body's first bytes are due like any later ones (a request without a body completes at once).
        self._body_due = self.loop.time() + self.body_timeout
        self._arm_body()
        super().on_headers_complete()
        cycle = self.cycle
        # The request's task is created but has not run yet: it looks ``send`` up on the cycle when it starts.
        if type(cycle) is RequestResponseCycle:
            cycle.__class__ = GatewayCycle
            # The protocol's loop: asyncio.get_running_loop() makes a getpid() system call each time.
            cast(GatewayCycle, cycle)._loop = self.loop
