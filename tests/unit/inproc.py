"""An in-process channel pair: both ends of the sync protocol in one process, over a socketpair.

``channel_pair()`` gives two ``wire.Channel``s joined like ssh's stdin/stdout would join them;
run the sender on one thread and the receiver (or ``remote.serve``) on another. The frames,
checksums and timeouts are the real ones: only the ssh process is left out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from vimgtools.sync.wire import Channel


@contextlib.contextmanager
def channel_pair(timeout: float = 10.0) -> Iterator[tuple[Channel, Channel]]:
    """(sender's channel, receiver's channel); the sockets are closed on the way out."""
    a, b = socket.socketpair()
    try:
        yield (
            Channel(a.fileno(), a.fileno(), peer="receiver", timeout=timeout),
            Channel(b.fileno(), b.fileno(), peer="sender", timeout=timeout),
        )
    finally:
        a.close()
        b.close()


class Background:
    """Run ``fn`` on a thread; ``result()`` returns its value or raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as e:
                self._error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 30.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the other end did not finish"
        if self._error is not None:
            raise self._error
        return self._value
