"""The running `edgekit serve` the serve tests talk to: the installed command in a subprocess on a free
loopback port, the lines it writes, and its /health as a client reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))  # the installed command, as users run it
KEY = "test-key"
MAX_TOKENS = 48
MAX_BODY = 8192
# an endless stream: long enough for a test to act while it runs
LONG = ["--max-tokens", "30000", "--ctx", "32768", "--threads", "1", "--grace", "1"]


class Served:
    """A running `edgekit serve`: its process, base URL and the lines it wrote on stderr."""

    def __init__(self, args: list[str], timeout: float = 120) -> None:
        self.proc = subprocess.Popen([EDGEKIT, "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={k: v for k, v in os.environ.items() if k != "EDGEKIT_API_KEY"})
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if line.startswith("serving http://"):
                    self.url = line.split()[1].removesuffix("/v1")
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()



def health(server: Served, key: str = KEY) -> dict:
    import httpx

    return httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {key}"} if key else {}).json()


def wait_idle(server: Served, model: str = "tiny-gguf", key: str = KEY, timeout: float = 30) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = health(server, key)
        if h["models"][model]["busy"] == 0 and h["generations"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"still busy: {h}")
