"""A loopback TCP proxy that can cut the link after N bytes, standing in for a cable pulled mid-push."""

from __future__ import annotations

import socket
import threading
import time


class CuttingProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; after ``cut_after`` client->server bytes it closes both sides.

    ``cut_after=None`` forwards everything. Each accepted connection counts its own bytes. ``rate`` (bytes
    per second, None: no limit) slows the client->server direction down, like a slow link.
    """

    def __init__(self, target: tuple[str, int], cut_after: int | None = None, rate: float | None = None) -> None:
        self.target = target
        self.cut_after = cut_after
        self.rate = rate
        self.cuts = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            budget = [self.cut_after]
            threading.Thread(target=self._pipe, args=(client, server, budget), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, budget: list[int | None] | None) -> None:
        try:
            while data := src.recv(65536):
                if budget is not None and budget[0] is not None:
                    if len(data) >= budget[0]:
                        dst.sendall(data[: budget[0]])
                        self.cuts += 1
                        break
                    budget[0] -= len(data)
                dst.sendall(data)
                if budget is not None and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
