"""Scheduler event streams, read from asyncio.

A :class:`~jaxinfer.scheduler.RequestStream` blocks its reader, so each stream gets a small
daemon thread that forwards its events into the event loop; :func:`merged` yields the events of
several streams (a request's ``n`` choices, a batch of prompts) as ``(index, event)`` in the
order they arrive. Leaving the iteration early for any reason (a client that went away, an
error, cancellation of the task) cancels every stream that has not finished, which frees its
slot within one scheduler step.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Awaitable, Callable, Sequence

from jaxinfer.scheduler import Event, RequestStream


def _pump(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, stream: RequestStream) -> None:
    def put(event: Event) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            return True
        except RuntimeError:  # the loop is closed: the server is gone
            stream.cancel()
            return False

    try:
        for event in stream:
            if not put(event):
                return
    except Exception as e:  # a stream never raises by contract; if it does, the client still hears of it
        put(Event(stream.request_id, finish_reason="error", message=f"internal error: {e}"))


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Event]]:
    """(index into ``streams``, event) until every stream has given its final event."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    for i, stream in enumerate(streams):
        threading.Thread(target=_pump, args=(loop, queue, i, stream), name=f"http-{stream.request_id}", daemon=True).start()
    open_ = set(range(len(streams)))
    try:
        while open_:
            i, event = await queue.get()
            if event.finish_reason is not None:
                open_.discard(i)
            yield i, event
    finally:
        for i in open_:
            streams[i].cancel()


class Connection:
    """Whether the client is still connected; the streams attached are cancelled when it leaves."""

    def __init__(self) -> None:
        self.gone = False
        self._streams: list[RequestStream] = []

    def attach(self, streams: Sequence[RequestStream]) -> None:
        self._streams.extend(streams)
        if self.gone:
            self.lost()

    def lost(self) -> None:
        self.gone = True
        for s in self._streams:
            s.cancel()


async def watch(receive: Callable[[], Awaitable[dict]], connection: Connection) -> None:
    """Wait for the ASGI ``http.disconnect`` (the request body has been read by then), then mark
    the connection lost. The server also sends it once the response is complete, harmlessly:
    every stream has finished by then."""
    while (await receive())["type"] != "http.disconnect":
        pass
    connection.lost()
