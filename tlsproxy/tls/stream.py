"""A trio stream over a non-blocking ``ssl.SSLSocket``.

Theory of operation
-------------------
``trio.SSLStream`` runs OpenSSL on memory BIOs and copies every byte between the BIO and the socket
in Python. That costs time on small writes and, worse, it marks the stream broken before flushing the
alert OpenSSL queued when a handshake fails, so a TLS 1.2 client sees a bare EOF instead of the
``protocol_version`` alert RFC 8446 prescribes.

Here OpenSSL owns the socket: ``SSL_read``/``SSL_write`` run directly on the file descriptor in
non-blocking mode, and when OpenSSL says it wants to read or write we park the task with trio's
``wait_readable``/``wait_writable`` and retry the same call. OpenSSL writes handshake alerts itself.

Rules that keep it correct:

* One receive and one send may run at once (like trio's ``SocketStream``); a second concurrent
  call of the same kind raises ``trio.BusyResourceError``.
* ``SSL_write`` is retried with the *same* buffer after ``WANT_WRITE`` (CPython sets
  ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER`` but not partial writes). A send that is cancelled half-way
  leaves OpenSSL expecting that retry, so the stream is marked broken.
* Every operation checks for cancellation at its start. One that had to wait has been through the
  scheduler; one that did not yields every ``YIELD_EVERY`` calls, not every time (a scheduler pass
  per send was a measurable share of a keep-alive request; fairness needs only a bound). That, the
  readiness waits and the two ways of closing are :class:`~tlsproxy.net.FdStream`'s, shared with
  the plain TCP stream.
* ``close_now``/``aclose`` send ``close_notify`` (best effort, never blocking) and close the
  descriptor; ``linger_close`` sends it, then FIN, and drops what the client still sends a moment.
* Only ``ssl.SSLSocket``'s public methods are called (``read``, ``write``, ``do_handshake``,
  ``pending``): no private attribute of the ``ssl`` module.
"""

from __future__ import annotations

import socket
import ssl

import trio

from ..net import FdStream

RECEIVE_SIZE = 256 * 1024   # OpenSSL hands back at most one 16 KiB record per SSL_read; we loop up to this

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint


class TLSStream(FdStream):
    """A TLS connection over a connected socket. Call :meth:`do_handshake` first."""

    __slots__ = ("_ssl", "_broken", "_full")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)      # an ioctl: skipped when the caller already did it
        self._ssl = context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                                        do_handshake_on_connect=False, suppress_ragged_eofs=True)
        super().__init__(self._ssl.fileno())
        self._broken = False
        self._full = False        # the last SSL_read got all it asked for: see receive_some

    # ------------------------------------------------------------------ facts about the connection
    @property
    def ssl_object(self) -> ssl.SSLSocket:
        return self._ssl

    def getpeercert(self, binary_form: bool = True):
        return self._ssl.getpeercert(binary_form=binary_form)

    def version(self) -> str | None:
        return self._ssl.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def session_reused(self) -> bool:
        return bool(self._ssl.session_reused)

    # ------------------------------------------------------------------ operations
    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        if self._broken:
            raise trio.BrokenResourceError("TLS stream is broken")

    async def do_handshake(self) -> None:
        """Run the handshake. Failures raise ``ssl.SSLError`` (after OpenSSL sent its alert) or
        ``trio.BrokenResourceError`` when the peer went away."""
        self._check()
        await _checkpoint_if_cancelled()
        blocked = False
        handshake = self._ssl.do_handshake
        while True:
            try:
                handshake()
                break
            except ssl.SSLWantReadError:
                wait = _wait_readable
            except ssl.SSLWantWriteError:
                wait = _wait_writable
            except ssl.SSLError:
                self._broken = True
                raise
            except OSError as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"handshake: {exc}") from exc
            blocked = True
            await wait(self._fd)     # outside the except clause: see receive_some
        if not blocked:
            await _cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            size = max_bytes or RECEIVE_SIZE
            blocked = False
            ssl_recv = self._ssl.read
            if self._sent_last and not (self._full and self._ssl.pending()):
                # Right after a send, the peer has not answered yet (a response to our request, the
                # next request after our response): an SSL_read now would only fail with WANT_READ,
                # a syscall and an exception. Wait for the socket first; if data is there already,
                # the wait ends on the scheduler's next pass.
                self._sent_last = False
                blocked = True
                await _wait_readable(self._fd)
            else:
                await _checkpoint_if_cancelled()
            want = min(size, 16384)
            while True:
                try:
                    data = ssl_recv(want)
                    break
                except ssl.SSLWantReadError:
                    wait = _wait_readable
                except ssl.SSLWantWriteError:
                    wait = _wait_writable   # rare (a key update while reading)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""     # close_notify, or a ragged EOF (ssl.py's suppress_ragged_eofs)
                    break
                except (ssl.SSLError, OSError) as exc:
                    if getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING":
                        data = b""   # a ragged EOF as CPython 3.11.2 reports it (not SSLEOFError)
                        break
                    self._broken = True
                    raise trio.BrokenResourceError(f"receive: {exc}") from exc
                # Parked outside the except clause: a task parked inside one keeps the exception
                # (and its traceback) alive for as long as it waits — ~0.8 KiB per idle connection.
                blocked = True
                if wait is _wait_readable:
                    await wait(self._fd)
                else:
                    await self._park_write_for_read()
            # SSL_read hands out one record at a time (no read-ahead): a read that got fewer bytes
            # than it asked for emptied its record, so OpenSSL holds nothing decrypted (no
            # SSL_pending call, which releases the GIL, needed); one that got all it asked for may
            # have left the rest of its record inside OpenSSL.
            full = len(data) == want
            if full:
                # A full record, or max_bytes reached: more is likely readable (bulk); drain it, up
                # to ``max_bytes`` (or RECEIVE_SIZE), in one call. A short record ends a burst:
                # another SSL_read would only fail with WANT_READ (a syscall and an exception per
                # receive, measured in docs/performance.md).
                chunks = None
                total = len(data)
                while total < size:
                    ask = min(16384, size - total)
                    try:
                        more = ssl_recv(ask)
                    except (ssl.SSLError, OSError):
                        full = False   # nothing more yet (WANT_READ), or EOF or an error: the next
                        break          # call reports those
                    if not more:
                        full = False
                        break
                    if chunks is None:
                        chunks = [data]
                    chunks.append(more)
                    total += len(more)
                    full = len(more) == ask
                if chunks is not None:
                    data = b"".join(chunks)
            self._full = full
            if not blocked:
                await self._maybe_yield()
            return data
        finally:
            self._receiving = False

    async def _park_write_for_read(self) -> None:
        # Rare (key update while reading). The send side may be parked on the same fd; share politely.
        try:
            await _wait_writable(self._fd)
        except trio.BusyResourceError:
            await trio.sleep(0.001)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            await _checkpoint_if_cancelled()
            view = memoryview(data)
            blocked = False
            ssl_send = self._ssl.write
            while view:
                try:
                    sent = ssl_send(view)
                    view = view[sent:]
                    continue
                except ssl.SSLWantWriteError:
                    wait = _wait_writable
                except ssl.SSLWantReadError:
                    wait = _wait_readable
                except (ssl.SSLError, OSError) as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"send: {exc}") from exc
                blocked = True          # parked outside the except clause (see receive_some)
                if wait is _wait_writable:
                    try:
                        await wait(self._fd)
                    except trio.Cancelled:
                        self._broken = True   # OpenSSL now expects this exact write to be retried
                        raise
                else:
                    try:
                        await wait(self._fd)
                    except trio.BusyResourceError:
                        await trio.sleep(0.001)
            self._sent_last = True
            if not blocked:
                await self._maybe_yield()
        finally:
            self._sending = False

    # ------------------------------------------------------------------ closing
    def _close_descriptor(self) -> None:
        if not self._broken:
            try:
                self._ssl.unwrap()       # close_notify, never blocking (the socket is non-blocking)
            except (ssl.SSLError, OSError, ValueError):
                pass   # WANT_READ after our close_notify went out, or the peer is gone: both fine
        try:
            self._ssl.close()
        except OSError:
            pass

    def _end_writing(self) -> bool:
        if self._broken:
            return False
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._broken = True          # close_notify is out: close_now must not send another
        return super()._end_writing()
