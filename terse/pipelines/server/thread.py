"""Run the app with uvicorn: blocking (`serve`) or in a background thread (`ServerThread`, for tests,
benchmarks and embedding a server in another program)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import uvicorn

from terse.errors import TerseError


class ServerThread:
    """Serve an ASGI app on host:port in a daemon thread; `port=0` binds a free port (see `.port`)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_keep_alive=30, backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="terse-server", daemon=True)
        self.host = host
        self.port = port

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        """Start and wait until the socket is bound; raise `TerseError` if the server fails to start."""
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s / 0.01)):
            if self._server.started:
                break
            if not self._thread.is_alive():
                raise TerseError(f"the server on {self.host}:{self.port} exited while starting (port in use?)")
            deadline.wait(0.01)
        else:
            raise TerseError(f"the server on {self.host}:{self.port} did not start within {timeout_s} s")
        sockets = [s for server in self._server.servers for s in server.sockets]
        self.port = int(sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        """The server root, e.g. http://127.0.0.1:54321 (the OpenAI API is under /v1)."""
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
