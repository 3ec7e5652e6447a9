"""The HTTP layers around ``edgekit serve``'s routes: errors as OpenAI's JSON bodies (:func:`error_answer`), an
unexpected exception's 500 answered inside CORS (:class:`ServerErrors`), and ``--cors`` (:class:`CORS`)."""

from __future__ import annotations

import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from edgekit.errors import EdgekitError, InputError
from edgekit.runtime.serve import protocol as oai
from edgekit.runtime.serve.protocol import RequestError

# uvicorn's own logger: it writes to stderr under `edgekit serve`, where uvicorn logged unhandled exceptions
log = logging.getLogger("uvicorn.error")


def error_answer(exc: Exception) -> tuple[dict[str, Any], int]:
    """An exception as OpenAI's error body and its HTTP status."""
    if isinstance(exc, RequestError):
        return exc.body(), exc.status
    if isinstance(exc, InputError):  # a prompt that does not fit the context, say
        return oai.error_body(str(exc), "invalid_request_error"), 400
    if isinstance(exc, EdgekitError):
        return oai.error_body(str(exc), "server_error"), 500
    return oai.error_body(one_line(exc), "server_error"), 500


def one_line(exc: Exception) -> str:
    """An unexpected exception as the client sees it: what it was, on one line; the traceback is the server's
    (a body with a traceback shows the server's internals to any client and breaks UIs that show the message)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(what) > 200:
        what = what[:199] + "…"
    return f"internal error ({what}); the server's log has the traceback: please report it"


class ServerErrors:
    """Turns an exception no handler took into OpenAI's JSON 500 here, inside :class:`CORS`, so that its answer
    carries the CORS headers as every other error does; Starlette's own 500 is sent by its outermost middleware,
    past CORS, and a browser page then sees an opaque network error. The traceback is logged once, to stderr.
    An exception after the status line went out (a stream) is left to uvicorn, which logs it and drops the
    connection; :meth:`Server._events` turns those it can into an error event first."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            log.error("%s %s failed (answered 500)", scope.get("method"), scope.get("path"), exc_info=exc)
            body, status = error_answer(exc)
            await JSONResponse(body, status_code=status)(scope, receive, send)


class CORS(CORSMiddleware):
    """Starlette's CORS middleware for ``--cors``, which answers preflights before any route (a browser sends
    them without the API key; the request that follows still needs it) and adds Access-Control-Allow-Origin
    and ``Vary: Origin`` to every answer to an allowed origin, streams included. The requested headers of an
    allowed origin are allowed (the openai JS client sends x-stainless-*), and so is Chrome's request to reach
    a private address from a public page: the origin list is the gate. Unlike Starlette's, a preflight it
    refuses carries no CORS headers at all and is an OpenAI-style JSON error, as every refusal here is."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        origin = request_headers["origin"]
        fix = f"restart the server with --cors {origin} to let this page call it" if "origin" in refused else \
            "pages may send GET and POST"
        message = f"CORS preflight from {origin} refused ({refused} not allowed): {fix}"
        return JSONResponse(oai.error_body(message, "invalid_request_error", code="cors_refused"),
                            status_code=response.status_code, headers={"Vary": response.headers["vary"]})
