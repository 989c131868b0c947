"""uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn bounds the wait between requests of a keep-alive connection (`timeout_keep_alive`) but not the
time headers take to arrive: its keep-alive timer stops at the first byte, so a client that opens a
connection and sends its headers a byte at a time holds a connection slot for as long as it likes, and
enough of them fill --max-connections. Here every connection has `header_timeout` seconds from its
opening, and from the end of each answer, to deliver a request's complete headers; past it the server
answers 408 and closes the connection. Bodies have their own deadline in the app (--body-timeout).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol


def _late_headers_answer(seconds: float) -> bytes:
    body = json.dumps({"error": f"the request's headers did not arrive within {seconds:g} s; send them at once "
                                "(--header-timeout)"}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class HeaderDeadline(H11Protocol):
    """One connection; built by uvicorn through `functools.partial(HeaderDeadline, header_timeout=...)`."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle
        super().data_received(data)
        if self.cycle is not waiting:  # uvicorn starts a request cycle once the headers are parsed
            self._disarm()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start the next, pipelined, request at once
        if self.cycle is answered and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_late(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_late_headers_answer(self.header_timeout))
            self.transport.close()
