"""Start `python -m labsupport.serving` in a subprocess on a free loopback port, and stop it.

Introduced in lab 30, whose online measurements talk to a real server over HTTP: whatever
starts a server also stops it, and a server that does not come up is reported with its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: its URL, its log, and `stop()`."""

    def __init__(self, args: list[str], port: int, env: dict | None = None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "labsupport.serving", *args,
                                      "--port", str(port)], env={**os.environ, **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        """Everything the server printed so far (empty once `serve` has removed the log)."""
        try:
            with open(self._log.name) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def health(self) -> dict | None:
        """The /health answer, or None if the server does not answer (yet)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while self.health() is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n"
                                   f"{self.log()}")
            if time.perf_counter() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not answer within {timeout_s} s:\n"
                                   f"{self.log()}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 20) -> int:
        """SIGTERM (requests in flight finish), then SIGKILL after timeout_s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def serve(model: str = "small", policy: str = "continuous", max_batch: int = 8,
          max_queue: int = 256, random_init: bool = False, port: int | None = None,
          startup_timeout_s: float = 600, env: dict | None = None):
    """Run the course's server on 127.0.0.1 for the length of a `with` block; yields it.

    The first start may train the zoo model (hence the long default startup timeout).
    """
    args = ["--model", model, "--policy", policy, "--max-batch", str(max_batch),
            "--max-queue", str(max_queue)] + (["--random-init"] if random_init else [])
    server = ServerProcess(args, port or free_port(), env)
    try:
        server.wait_ready(startup_timeout_s)
        yield server
    finally:
        server.stop()
        os.unlink(server._log.name)
