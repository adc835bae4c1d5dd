"""uvicorn's httptools HTTP/1.1 protocol with limits on what one connection may hold.

uvicorn bounds neither the size of a request's headers nor the time a client may take to send them or the body,
and it starts its keep-alive timer only after a first response: one 48 MB header held the event loop (and so
``/healthz``) for seconds while httptools accumulated it, and connections that sent nothing, or a byte now and
then, stayed open for good. ``GuardedHttpProtocol`` adds:

* a header limit: once a request's line and headers pass ``max_header_bytes`` it is answered 431 and the
  connection closed, before the parser buffers any more of it;
* a header deadline: a connection must deliver a request's complete headers within ``header_timeout_s`` of
  opening (on a kept-alive connection: of the request's first byte), else 408 (or, if nothing came, a plain
  close);
* a body deadline: the complete body within ``body_timeout_s`` of the headers, else the connection is closed
  (the app sees a disconnect).

Idle kept-alive connections are closed by uvicorn's ``timeout_keep_alive`` and the number of connections is
bounded by its ``limit_concurrency`` (503 beyond); ``service.cli`` sets both from the settings.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

END_OF_HEADERS = b"\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)


def _error_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the limits of ``ConnectionLimits`` (pass them with ``functools.partial`` as
    uvicorn's ``http`` class: a partial of this class pickles into each worker process)."""

    def __init__(self, *args: Any, limits: ConnectionLimits = ConnectionLimits(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_headers = True  # waiting for (the rest of) a request's line and headers
        self._header_bytes = 0
        self._tail = b""  # last bytes seen while in headers: an end marker split over two reads is still found
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    # -- timers ------------------------------------------------------------------------------------------
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._header_bytes:
            seconds = f"{self.limits.header_timeout_s:g}"
            self._refuse(408, "Request Timeout", f"request headers not complete within {seconds} s")
        else:
            self.transport.close()  # an idle connection: nothing to answer

    def _body_too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()  # the app waiting for the body sees a disconnect

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self._refused = True
        self._disarm()
        self.transport.write(_error_response(status, reason, detail))
        self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_headers:
            window = self._tail + data
            end = window.find(END_OF_HEADERS)
            self._header_bytes += len(data) if end < 0 else max(0, end + len(END_OF_HEADERS) - len(self._tail))
            self._tail = window[-(len(END_OF_HEADERS) - 1) :]
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"request line and headers over {self.limits.max_header_bytes} bytes")  # fmt: skip
                return
        super().data_received(data)
        # Timers only for what is left waiting (a request that arrived whole, the usual case, arms none). A
        # deadline already running (from the connection's opening, or from the request's first bytes) stays.
        if self._deadline is None and not self._refused and not self.transport.is_closing():
            if not self._in_headers:
                self._arm(self.limits.body_timeout_s, self._body_too_slow)
            elif self._header_bytes:
                self._arm(self.limits.header_timeout_s, self._headers_too_slow)

    # -- parser callbacks ----------------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers, self._header_bytes, self._tail = False, 0, b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers = True  # the next request's headers; a deadline starts if they arrive incomplete
        super().on_message_complete()
