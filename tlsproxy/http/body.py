"""The request body of an HTTP/1.1 exchange, as the exchange sees it: data, then an End.

An exchange (``duplex.py``, ``local.py``) never touches HTTP/1.1 framing: it asks
:meth:`RequestBody.poll` for the next event (body data, an :class:`~.exchange.End` with the
trailers, or None when nothing is buffered) and, when None, awaits :meth:`RequestBody.wait`, which
receives from the client under the body's deadlines. An HTTP/2 stream will be another source with
the same two methods. Here the bytes are decoded by :class:`~.framing.BodyReader`; its framing
errors become 400 answers.

Deadlines (on the watch the caller passes): ``body_timeout_s`` of inactivity (a stalled body is
cut), and a minimum *average* rate once ``min_body_rate_grace_s`` passed — a byte every few seconds
never trips an inactivity timer, so the rate is what cuts a trickle (408 before any response).
Only time spent waiting for the client counts: an app that reads slowly does not make its client
slow.
"""

from __future__ import annotations

import time

from ..errors import HTTPError
from . import framing
from .deadlines import Watch
from .exchange import End, Limits
from .shell import BODY_IN, BODY_RATE, Close, receive

_now = time.monotonic


class RequestBody:
    """One request body on an HTTP/1.1 client connection. See the module docstring."""

    __slots__ = ("stream", "reader", "limits", "waited_s")

    def __init__(self, stream, reader: framing.BodyReader, limits: Limits) -> None:
        self.stream = stream
        self.reader = reader
        self.limits = limits
        self.waited_s = 0.0            # time spent waiting for the client's bytes

    @property
    def done(self) -> bool:
        return self.reader.done

    @property
    def data_bytes(self) -> int:
        return self.reader.data_bytes

    def rest(self) -> bytes:
        """What the client sent beyond the body (a pipelined request), once it ended."""
        return self.reader.rest()

    def poll(self) -> bytes | bytearray | End | None:
        """The next buffered event: body data, the End (with trailers), or None (wait first)."""
        try:
            event = self.reader.next()
        except framing.FramingError as exc:
            raise HTTPError(400, f"bad request: {exc}", kind=exc.kind) from None
        return None if event is framing.NEED_DATA else event

    async def wait(self, watch: Watch, *, arm: bool = True) -> None:
        """Receive more of the body (``arm``: under the body deadlines, else under the caller's)."""
        if arm:
            limits = self.limits
            timeout, phase = limits.body_timeout_s, BODY_IN
            rate = limits.min_body_rate_bps
            if rate > 0:
                allowed = max(limits.min_body_rate_grace_s, self.reader.data_bytes / rate) - self.waited_s
                if allowed < timeout:
                    timeout, phase = max(allowed, 0.0), BODY_RATE
            t = _now()
            watch.arm(phase, timeout)
            data = await receive(self.stream)
            self.waited_s += _now() - t
        else:
            data = await receive(self.stream)
        if not data:
            raise Close("client closed during request body")
        self.reader.feed(data)
