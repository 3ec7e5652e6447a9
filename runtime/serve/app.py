"""The HTTP side of ``edgekit serve``: Starlette routes under uvicorn.

Every refusal is an OpenAI-style JSON error (``{"error": {"message", "type", "param", "code"}}``) with
its HTTP status, so clients show the message. A request first waits for a free instance of its model
(while waiting, a client that hangs up leaves the queue); a streamed one then waits for its first token
(so that a prompt the backend refuses is a 400 too) and answers with server-sent events, and a client that
disconnects mid-stream cancels its generation at the next token. SIGINT and
SIGTERM stop accepting connections, give running streams ``shutdown_timeout`` seconds to finish, cancel
the rest, then unload every model. Browser pages from other origins may call it only where ``--cors`` names
their origin (:class:`CORS`); every error answer to such a page carries the CORS headers, an unexpected
exception's 500 included (:class:`ServerErrors`), so the page can read why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgekit.errors import EdgekitError, InputError
from edgekit.runtime.base import Backend
from edgekit.runtime.serve import protocol as oai
from edgekit.runtime.serve.config import ServeConfig
from edgekit.runtime.serve.generation import Generation
from edgekit.runtime.serve.middleware import CORS, ServerErrors, error_answer
from edgekit.runtime.serve.middleware import log as _log
from edgekit.runtime.serve.pool import ModelPool, Opener, describe
from edgekit.runtime.serve.protocol import Job, RequestError


class _ClientGone(Exception):
    """The client hung up before its answer started."""


class EventStream(StreamingResponse):
    """Server-sent events that notice a client hanging up at once, even between tokens (Starlette's own
    only notices on the next write under ASGI 2.4), and always run ``cleanup``."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the socket closed under a write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._cleanup()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


class Server:
    """The app's state: config, model pool, the generations whose threads run (cancelled at shutdown)."""

    def __init__(self, config: ServeConfig, opener: Opener, preloaded: dict[str, Backend] | None = None) -> None:
        self.config = config
        self.opener = opener
        self.preloaded = dict(preloaded or {})
        self.pool: ModelPool | None = None
        self.running: set[Generation] = set()
        self.stopping = False

    def stop_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """On SIGINT/SIGTERM (from the signal handler): let running answers go on for most of the grace
        period, then stop them, so that each ends with an error event instead of a dropped connection."""
        grace = max(self.config.shutdown_timeout - 1.0, self.config.shutdown_timeout / 2)
        loop.call_soon_threadsafe(loop.call_later, grace, self._stop_all)

    def _stop_all(self) -> None:
        self.stopping = True
        for gen in list(self.running):
            gen.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.pool = ModelPool(self.config, self.opener, self.preloaded)
        try:
            yield
        finally:
            running = list(self.running)
            for gen in running:
                gen.cancel()
            await asyncio.to_thread(lambda: [g.join(10) for g in running])
            await asyncio.sleep(0.1)  # their instances come back through loop callbacks
            await self.pool.close()

    # -- routes --------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": describe(self._pool())})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        mid = request.path_params["model"]
        self._pool().path(mid)  # the 404 that lists the served ids
        return JSONResponse(next(entry for entry in describe(self._pool()) if entry["id"] == mid))

    async def health(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"status": "ok", "models": self._pool().state(), "generations": len(self.running)})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def text(self, request: Request) -> Response:
        return await self._complete(request, "text")

    # -- a completion ----------------------------------------------------------------------------------

    async def _complete(self, request: Request, kind: str) -> Response:
        self._authorize(request)
        from starlette.requests import ClientDisconnect

        try:
            raw = await self._body(request)
        except ClientDisconnect:  # the client left before its body arrived: nobody to answer
            return Response(status_code=499)
        job = oai.parse_job(kind, oai.parse_body(raw), self.config.max_tokens)
        pool = self._pool()
        pool.path(job.model)  # an unknown model is a 404 before anything waits
        deadline = asyncio.get_running_loop().time() + self.config.timeout
        try:
            backend = await self._lease(request, job.model, deadline)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
        except RequestError:
            raise
        except EdgekitError as exc:  # the server's options, not the request: a 500 the operator must fix
            raise RequestError(f"the server could not load {job.model}: {exc}", status=500,
                               code="model_load_failed") from exc
        if self.stopping:  # a request that waited for an instance while the server began to stop
            pool.give_back(job.model, backend)
            raise _stopped()
        loop = asyncio.get_running_loop()

        def done(failure: BaseException | None) -> None:  # in the generation's thread, once the backend is free
            pool.give_back(job.model, backend, failure)
            with contextlib.suppress(RuntimeError):  # `gen` is looked up on the loop, after it is assigned
                loop.call_soon_threadsafe(lambda: self.running.discard(gen))

        gen = Generation(backend, job.prompt, job.sampling, done)
        self.running.add(gen)
        rid = oai.new_id(job)
        if job.stream:
            try:
                pieces, first = await self._first(request, gen, deadline)
            except _ClientGone:
                return Response(status_code=499)
            if self.stopping and gen.cancelled:  # stopped by SIGTERM before its first token: a JSON 503
                raise _stopped()
            return EventStream(self._events(job, rid, gen, pieces, first, deadline), lambda: self._finish(gen))
        try:
            text = await self._collect(request, gen, deadline)
        finally:
            self._finish(gen)
        if self.stopping and gen.cancelled:
            raise _stopped()
        return JSONResponse(oai.completion(job, rid, text, gen.stats))

    def _finish(self, gen: Generation) -> None:
        gen.cancel()  # a no-op once it has ended; it leaves `running` when its thread has

    async def _lease(self, request: Request, model: str, deadline: float) -> Backend:
        """A free instance of ``model``; raises :class:`_ClientGone` if the client hangs up while waiting,
        a 504 at the deadline. A lease that comes through after either is given straight back."""
        lease = asyncio.ensure_future(self._pool().lease(model))
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            done, _ = await asyncio.wait({lease, gone}, timeout=_left(deadline),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if lease in done:
            return lease.result()
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            got = await lease
            self._pool().give_back(model, got)  # it was handed over just as we gave up on it
        if gone in done:
            raise _ClientGone
        raise RequestError(f"no instance of {model} came free within the request timeout "
                           f"({self.config.timeout:g} s); retry later, or start the server with a larger "
                           "--parallel or --timeout", status=504, code="timeout")

    async def _collect(self, request: Request, gen: Generation, deadline: float) -> str:
        async def read() -> str:
            return "".join([piece async for piece in gen])

        task, how = await _race(request, read(), deadline)
        if how == "done":
            return task.result()
        if how == "gone":
            return ""  # the client left; nobody reads the answer
        raise self._too_slow()

    def _too_slow(self) -> RequestError:
        return RequestError(f"the answer took longer than the request timeout ({self.config.timeout:g} s); ask "
                            "for fewer tokens, or start the server with a larger --timeout", status=504,
                            code="timeout")

    async def _first(self, request: Request, gen: Generation, deadline: float) -> tuple[AsyncIterator[str], str | None]:
        """The generation's pieces and its first one (None: it ended without text), awaited before a stream's
        status line goes out: a prompt the backend refuses (longer than the context, say) is then a 400, as
        it is unstreamed, not an error event after a 200 that clients report as a generic failure. The first
        text chunk goes out no later than before; only the role chunk waits for it. Raises
        :class:`_ClientGone` if the client hangs up meanwhile, a 504 at the deadline; the generation is
        cancelled then (its stream never starts)."""
        pieces = aiter(gen)
        first, how = await _race(request, anext(pieces, None), deadline)
        if how == "done":
            try:
                return pieces, first.result()
            except BaseException:
                self._finish(gen)
                raise
        self._finish(gen)
        if how == "gone":
            raise _ClientGone
        raise self._too_slow()

    async def _events(self, job: Job, rid: str, gen: Generation, pieces: AsyncIterator[str], first: str | None,
                      deadline: float) -> AsyncIterator[bytes]:
        try:
            if job.kind == "chat":  # the role comes first, as OpenAI's streams do
                yield oai.sse(oai.chunk(job, rid, None, first=True))
            piece = first
            while piece is not None:
                if piece:
                    yield oai.sse(oai.chunk(job, rid, piece))
                piece = await asyncio.wait_for(anext(pieces, None), _left(deadline))
            if self.stopping and gen.cancelled:
                raise _stopped()
            yield oai.sse(oai.chunk(job, rid, None, reason=oai.finish_reason(gen.stats)))
            if job.include_usage:
                yield oai.sse(oai.usage_chunk(job, rid, gen.stats))
            yield oai.sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - reported to the client, and logged when unexpected
            # the status line has gone out: the error travels as an event, which clients raise
            if isinstance(exc, asyncio.TimeoutError):
                exc = RequestError(f"the answer took longer than the request timeout ({self.config.timeout:g} s)",
                                   status=504, code="timeout")
            elif not isinstance(exc, EdgekitError):
                _log.error("a streamed answer failed (its client got a server_error event)", exc_info=exc)
            yield oai.sse(error_answer(exc)[0])
        finally:
            self._finish(gen)

    # -- limits ----------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            # RFC 6750: a 401 names the scheme, and says invalid_token where a token came and was wrong
            challenge = 'Bearer error="invalid_token"' if given else "Bearer"
            raise RequestError("missing or wrong API key: send the key the server was started with (--api-key) "
                               "as 'Authorization: Bearer KEY'", status=401, code="invalid_api_key",
                               headers={"WWW-Authenticate": challenge})

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body
        declared = request.headers.get("content-length", "")
        too_big = RequestError(f"the request body is over this server's limit of {limit:,} bytes; send a shorter "
                               "prompt, or start the server with a larger --max-body", status=413,
                               code="body_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    def _pool(self) -> ModelPool:
        assert self.pool is not None, "the app's lifespan has not started"
        return self.pool


def _stopped() -> RequestError:
    return RequestError("the server is shutting down (SIGINT/SIGTERM) and stopped this answer before it finished; "
                        "retry once it is back", status=503, code="server_shutting_down")


def _left(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.0)


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (its body has been read, so the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _race(request: Request, work: Awaitable[Any], deadline: float) -> tuple[asyncio.Future, str]:
    """Run ``work`` until it ends, the client hangs up or ``deadline`` passes: (its task, ``"done"``, ``"gone"``
    or ``"late"``); unless done, the task is cancelled."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=_left(deadline), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task, "done"
    task.cancel()
    return task, "gone" if gone in done else "late"


def create_app(config: ServeConfig, opener: Opener, preloaded: dict[str, Backend] | None = None) -> Starlette:
    """The ASGI app; ``opener(path, **options)`` loads a model (``edgekit.api.open_backend``); ``preloaded``:
    instances already loaded, by model id (the pool's first, closed with it)."""
    server = Server(config, opener, preloaded)

    async def on_error(request: Request, exc: Exception) -> Response:
        body, status = error_answer(exc)
        return JSONResponse(body, status_code=status, headers=exc.headers if isinstance(exc, RequestError) else None)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        hint = {404: f"no route {request.url.path}; this server has /v1/models, /v1/chat/completions and "
                     "/v1/completions", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(oai.error_body(hint.get(exc.status_code, str(exc.detail)), "invalid_request_error"),
                            status_code=exc.status_code)

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.text, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    # CORS only for the origins the operator named: by default no web page the user visits can call a local server
    middleware = [Middleware(CORS, allow_origins=config.cors, allow_methods=("GET", "POST", "OPTIONS"),
                             allow_headers=("*",), allow_private_network=True, max_age=600)] if config.cors else []
    middleware.append(Middleware(ServerErrors))  # inside CORS: an unexpected exception's 500 carries its headers
    # `Exception: on_error` is Starlette's outermost 500, for an exception in the CORS middleware itself
    app = Starlette(routes=routes, lifespan=server.lifespan, middleware=middleware,
                    exception_handlers={HTTPException: on_http, EdgekitError: on_error, Exception: on_error})
    app.state.server = server
    return app


def serve(config: ServeConfig, opener: Opener, on_ready: Callable[[str], None] | None = None,
          preloaded: dict[str, Backend] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (blocking); ``on_ready`` gets its base URL once it listens;
    ``preloaded``: instances loaded before (the caller closes them too when the server never started)."""
    import socket

    import uvicorn

    # Bind here, so a port in use is one clear error (uvicorn would log it and exit) and port 0 works.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); pick another "
                         "--port, or a --host that is an address of this machine") from None
    app = create_app(config, opener, preloaded)
    uconfig = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=config.shutdown_timeout)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and loop is not None:
                app.state.server.stop_soon(loop)

    loop: asyncio.AbstractEventLoop | None = None
    server = Uvicorn(uconfig)
    host, port = sock.getsockname()[:2]
    startup = server.startup

    async def started(sockets: Any = None) -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        await startup(sockets)
        if on_ready is not None:
            on_ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    server.startup = started  # type: ignore[method-assign]
    quiet = _ForcedExitFilter()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run(sockets=[sock])
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
        sock.close()


class _ForcedExitFilter(logging.Filter):
    """Drops the traceback uvicorn logs when a second Ctrl-C forces the exit: it skips the lifespan's
    shutdown, the lifespan task still waiting for it is cancelled, and Starlette reports that as a failed
    shutdown whose message is the CancelledError's traceback. A forced exit is what the user asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            return False
        text = record.getMessage()
        return not (text.startswith("Traceback") and text.rstrip().endswith("CancelledError"))
