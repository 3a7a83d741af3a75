"""Putting the server together: settings, the engine's model loading, the socket and uvicorn.

``Server(settings, load)`` builds the registry, the engine and the ASGI app; ``load()`` returns the base
``(model, tokenizer)`` (the CLI passes its checked loader; tests pass one for a model they built), and the
engine loads the start-up adapters on top. The socket is bound before the model loads, so ``/health``
answers (503, loading) from the first second; a model or adapter that fails to load stops the server.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any, Callable

from ..errors import ConfigError
from .adapters import Adapter, AdapterRegistry, attach, chat_template_of
from .app import create_app
from .engine import Engine
from .limits import ServeLimits

log = logging.getLogger("lorakit.serve")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    #: the base model's name in requests' ``model`` field and in /v1/models
    model_name: str
    #: adapters loaded at start: (name, folder) pairs
    adapters: tuple[tuple[str, str], ...] = ()
    #: folder under which POST /v1/load_lora_adapter may read adapters; None: run-time loading is off
    adapter_root: str | None = None
    #: when set, every endpoint but /health needs ``Authorization: Bearer <api_key>``
    api_key: str | None = None
    limits: ServeLimits = ServeLimits()


class Server:
    def __init__(self, settings: ServeSettings, load: Callable[[], tuple[Any, Any]]):
        self.settings = settings
        self.registry = AdapterRegistry(settings.model_name, settings.adapter_root)
        self.uvicorn: Any = None
        self.engine = Engine(self._loader(load), settings.limits, on_failure=self._failed)
        self.app = create_app(self.engine, self.registry, settings.limits, settings.api_key)

    def _loader(self, load: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
        def load_all():
            model, tokenizer = load()
            model.eval()
            for name, folder in self.settings.adapters:
                template = chat_template_of(folder)
                model, warnings = attach(model, name, folder)
                for w in warnings:
                    log.warning("adapter %s: %s", name, w)
                self.registry.reserve(name)
                self.registry.release(name, Adapter(name=name, path=folder, template=template))
            return model, tokenizer
        return load_all

    def _failed(self, reason: str) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True

    def uvicorn_server(self, log_level: str = "info"):
        import uvicorn

        config = uvicorn.Config(self.app, log_level=log_level, access_log=log_level == "debug", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        return self.uvicorn

    def serve(self, sock: socket.socket, log_level: str = "info") -> None:
        """Start the engine and answer on ``sock`` until stopped (Ctrl-C, or a failed model load)."""
        server = self.uvicorn_server(log_level)
        self.engine.start()
        try:
            server.run(sockets=[sock])
        finally:
            self.engine.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a ConfigError saying why it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine has ({e.strerror}); use 127.0.0.1 "
                          f"(this machine only) or 0.0.0.0 (every network)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (or stop the "
                          f"program using it)") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
