"""From the engine's thread to the event loop: engine events are buffered and delivered to each request's
inbox on its loop, one wake-up per engine step; a request's client going away ends its events (the caller
then cancels its sequences)."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mptkit.infer.engine import Engine, Event
    from mptkit.infer.server._deps import Request


class Relay:
    """Hands engine events (engine thread) to the requests' inboxes on one event loop.

    ``call_soon_threadsafe`` wakes the loop through its self-pipe (a syscall and a GIL hand-off) each time, so
    events are buffered and the loop is woken once per batch — by the engine (``Engine.add_waker``) as its next
    forward pass starts: the loop's Python (SSE formatting and writes, per event; measured:
    bench/results/inference.md) then runs while the engine computes outside the GIL rather than contending
    with its sampling and step set-up. Events put from
    the loop's own thread (a request finished at submission) are delivered at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.loop_thread = threading.get_ident()  # made on the loop
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, q: Inbox, ev: Event) -> None:
        if threading.get_ident() == self.loop_thread:
            q.put(ev)
            return
        if self.loop.is_closed():  # the server is shutting down: nobody is listening
            raise RuntimeError("event loop closed")  # the engine cancels the request
        with self.lock:
            self.pending.append((q, ev))

    def kick(self) -> bool:
        """Wake the loop to deliver what is pending (any thread); False once the loop is closed (the engine then
        drops this relay's waker)."""
        if self.loop.is_closed():
            with self.lock:
                self.pending.clear()
            return False
        with self.lock:
            if not self.pending or self.scheduled:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop closed meanwhile (server shutting down): nobody is listening
            with self.lock:
                self.pending.clear()
                self.scheduled = False
            return False
        return True

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for q, ev in items:
            q.put(ev)


class LoopRelays:
    """One :class:`Relay` per event loop that serves requests, each registered as a waker of the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.relays: dict[asyncio.AbstractEventLoop, Relay] = {}

    def get(self, loop: asyncio.AbstractEventLoop) -> Relay:
        relay = self.relays.get(loop)
        if relay is None:
            for old in [lp for lp in self.relays if lp.is_closed()]:  # loops that are gone (a test client's)
                del self.relays[old]
            relay = self.relays[loop] = Relay(loop)
            self.engine.add_waker(relay.kick)
        return relay


class Inbox:
    """One request's events on the event loop (loop thread only): ``put`` from the relay's flush, ``get`` with a
    timeout. A future and a timer per wait — ``asyncio.wait_for(queue.get(), t)`` makes a task besides, per
    token of every stream (each costing loop time, on a loop that shares the cores with the engine)."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque[Event] = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, ev: Event) -> None:
        self.items.append(ev)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        if not self.items:
            fut = self.waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _wake, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self.waiter = None
        return self.items.popleft() if self.items else None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


CLIENT_GONE: Any = object()  # put in a request's inbox when its client disconnects


async def await_disconnect(request: Request, q: Inbox) -> None:
    """Wait for the client of a request whose body is read to disconnect, then wake its inbox with
    ``CLIENT_GONE`` (ASGI: once the body is in, ``receive`` returns only ``http.disconnect``)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            q.put(CLIENT_GONE)
            return
