"""Web apps: ``@gust.http`` serves HTTP with the whole request in hand.

An ``@gust.function`` gets a body and headers. A web app wants the method
and the path too, so ``gust build`` turns an app that uses ``@gust.http``
into a ``wasi:http/proxy`` component instead; the host then routes
``/http/{tenant}/{name}/…`` to it, with the path after the function's name::

    import gust

    @gust.http
    def app(req: gust.HttpRequest):
        if req.method == "GET" and req.path == "/":
            return "Hello from the web!"
        return gust.Response.text("not found", status=404)

The handler returns what an ``@gust.function`` returns (``Response``,
``bytes``, ``str``, ``dict``/``list`` as JSON, ``None`` for 204). Raising
``gust.Error`` answers with its status and an ``application/problem+json``
body; any other exception answers 500 ``unhandled-exception`` with the
type, message and traceback, which also go to stderr, so the invocation
record keeps them.
"""

from __future__ import annotations

import json as _json
import sys as _sys
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs as _parse_qs
from urllib.parse import unquote as _unquote

# `_base` holds what both kinds of app share; it imports no bindings of
# either world.
from ._base import Error, Request, Response, _describe_exception, _name, _to_response
from .tensor import TensorError

# Bytes per `blocking-write-and-flush`: the most wasi:io promises to take.
_WRITE_CHUNK = 4096
# Bytes asked for per read of the request body.
_READ_CHUNK = 65536


class HttpRequest(Request):
    """One HTTP request to a web app.

    Besides what a :class:`Request` has (``body``, ``content_type``,
    ``headers``, ``invocation_id``), ``method`` is the upper-case method,
    ``path`` the percent-decoded path after ``/http/{tenant}/{name}``
    (always starting with ``/``) and ``query`` the raw query string (no
    ``?``; empty when there is none).
    """

    __slots__ = ("method", "path", "query")

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        query: str = "",
        body: bytes = b"",
        content_type: str = "application/octet-stream",
        headers: Optional[List[Tuple[str, str]]] = None,
        invocation_id: str = "",
    ) -> None:
        super().__init__(body, content_type, headers, invocation_id)
        self.method = method
        self.path = path
        self.query = query

    def query_params(self) -> Dict[str, List[str]]:
        """The query string parsed: each name with all its values, in order."""
        return _parse_qs(self.query, keep_blank_values=True)

    def param(self, name: str) -> Optional[str]:
        """The first value of query parameter ``name``, or ``None``."""
        values = self.query_params().get(name)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"HttpRequest({self.method} {self.path!r}, {len(self.body)} bytes)"


# The user's web handler, set once by `@gust.http` when the app module is
# imported (at build time: componentize-py snapshots the initialised module).
_http_handler: Optional[Callable[[HttpRequest], Any]] = None


def http(handler: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    """Registers ``handler`` as this component's web app (see the module
    documentation). Use it on exactly one function, and not together with
    ``@gust.function``; the function is returned unchanged."""
    global _http_handler
    if not callable(handler):
        raise TypeError("@gust.http decorates a function taking a gust.HttpRequest")
    if _http_handler is not None and _http_handler is not handler:
        raise RuntimeError(
            f"@gust.http is used twice ({_name(_http_handler)} and {_name(handler)}); "
            "an app serves HTTP from exactly one function"
        )
    _http_handler = handler
    return handler


_METHODS = {
    "Method_Get": "GET",
    "Method_Head": "HEAD",
    "Method_Post": "POST",
    "Method_Put": "PUT",
    "Method_Delete": "DELETE",
    "Method_Connect": "CONNECT",
    "Method_Options": "OPTIONS",
    "Method_Trace": "TRACE",
    "Method_Patch": "PATCH",
}


def _method_name(method: Any) -> str:
    name = _METHODS.get(type(method).__name__)
    return name if name is not None else str(getattr(method, "value", "")).upper()


def _problem(status: int, code: str, detail: str) -> Response:
    """An ``application/problem+json`` response, as the host's own errors."""
    body = {"type": "about:blank", "title": code, "status": status, "detail": detail, "code": code}
    return Response(_json.dumps(body, ensure_ascii=False), status, "application/problem+json")


def _exception_response(e: BaseException) -> Response:
    """A 500 naming the exception, with its traceback (also on stderr, so
    the invocation record keeps it)."""
    described = _describe_exception(e, _serve)
    print(described, file=_sys.stderr)
    return _problem(500, "unhandled-exception", described)


def _serve(handler: Callable[[HttpRequest], Any], request: HttpRequest) -> Response:
    """Runs the handler; every way it can fail becomes a response."""
    try:
        return _to_response(handler(request))
    except Error as e:
        status = e.status if e.status is not None and 400 <= e.status <= 599 else 500
        return _problem(status, e.code, e.message)
    except TensorError as e:
        return _problem(e.status() or 500, f"gpu-{e.code}", e.message)
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything
        return _exception_response(e)


def _handler_class() -> type:
    """The ``wasi:http/incoming-handler`` export, for the generated entry
    module of a web app. The bindings exist only in a web app's build, so
    they are imported here, not at the top."""
    from componentize_py_types import Err, Ok
    from wit_world import exports
    from wit_world.imports import streams as _streams
    from wit_world.imports import wasi_http_types as _http

    def read_body(incoming: Any) -> bytes:
        body = incoming.consume()
        stream = body.stream()
        chunks = []
        while True:
            try:
                chunks.append(stream.blocking_read(_READ_CHUNK))
            except Err as e:
                if isinstance(e.value, _streams.StreamError_Closed):
                    break
                raise
        # A child resource goes before its parent.
        stream.__exit__(None, None, None)
        _http.IncomingBody.finish(body).__exit__(None, None, None)
        return b"".join(chunks)

    def request_of(incoming: Any) -> HttpRequest:
        headers = [
            (name, value.decode("latin-1")) for name, value in incoming.headers().entries()
        ]
        target = incoming.path_with_query() or "/"
        path, _, query = target.partition("?")
        request = HttpRequest(
            method=_method_name(incoming.method()),
            path=_unquote(path) or "/",
            query=query,
            body=read_body(incoming),
            headers=headers,
        )
        request.content_type = request.header("content-type") or "application/octet-stream"
        request.invocation_id = request.header("gust-invocation-id") or ""
        return request

    def send(out: Any, response: Response) -> None:
        headers = [(name, value.encode("latin-1")) for name, value in response.headers]
        headers.append(("content-type", response.content_type.encode("latin-1")))
        try:
            fields = _http.Fields.from_list(headers)
        except Err as e:
            response = _problem(
                500,
                "invalid-header",
                f"the app's response headers were refused ({type(e.value).__name__}): "
                f"{[name for name, _ in response.headers]}",
            )
            fields = _http.Fields.from_list([("content-type", response.content_type.encode())])
        outgoing = _http.OutgoingResponse(fields)
        try:
            outgoing.set_status_code(response.status)
        except Err:
            outgoing.set_status_code(500)
            response = _problem(500, "invalid-status", f"the app answered status {response.status}")
        body = outgoing.body()
        _http.ResponseOutparam.set(out, Ok(outgoing))
        stream = body.write()
        data = response.body
        for start in range(0, len(data), _WRITE_CHUNK):
            stream.blocking_write_and_flush(data[start : start + _WRITE_CHUNK])
        stream.__exit__(None, None, None)
        _http.OutgoingBody.finish(body, None)

    class IncomingHandler(exports.IncomingHandler):
        """The export componentize-py calls: one HTTP request."""

        def handle(self, incoming: Any, out: Any) -> None:
            handler = _http_handler
            try:
                request = request_of(incoming)
            except BaseException as e:  # noqa: BLE001
                send(out, _problem(400, "invalid-request", f"could not read the request: {e}"))
                return
            if handler is None:
                send(out, _problem(500, "no-function", "the app registered no @gust.http"))
                return
            send(out, _serve(handler, request))

    return IncomingHandler
