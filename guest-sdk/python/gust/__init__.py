"""Write Gust functions in Python.

A Gust function is a WebAssembly component that exports
``gust:function/handler``. ``gust build app.py`` turns a Python module into
one with componentize-py; this package is the layer between the generated
bindings and your code, so a whole function is a few lines::

    import gust

    @gust.function
    def handle(req: gust.Request) -> str:
        return f"Hello, {req.text()}!"

The decorated function receives a :class:`Request` and returns a
:class:`Response`, ``bytes`` (``application/octet-stream``), ``str``
(``text/plain``), a ``dict`` or ``list`` (JSON) or ``None`` (204, empty).

Raising :class:`Error` is a normal, recorded outcome that the host answers
with an HTTP error. Any other uncaught exception becomes the error
``unhandled-exception`` (status 500) whose message carries the exception's
type, message and traceback, so it shows up in the invocation record
instead of trapping the instance.

A web app that wants the method and path uses :func:`http` instead
(``@gust.http``, receiving an :class:`HttpRequest`); ``gust build`` then
makes a ``wasi:http/proxy`` component, served at ``/http/{tenant}/{name}/``.

Host-resident tensors are :class:`Tensor` and resident models are
:class:`Model`; neither needs numpy.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from componentize_py_types import Err as _Err

try:
    from wit_world.imports import gust_function_types as _types
    from wit_world.imports import output as _output
except ImportError:
    # A web app's build (`@gust.http`): its world has no handler and no
    # `output`; `Handler` and `emit` are then unused or refuse.
    _types = None
    _output = None

from ._base import Error, Request, Response, _describe_exception, _name, _to_response
from .fetch import FetchError, FetchResponse, fetch
from .model import GenerateParams, Model
from .tensor import BlockFormat, Dtype, Tensor, TensorError, devices
from .web import HttpRequest, http

__all__ = [
    "BlockFormat",
    "Dtype",
    "Error",
    "FetchError",
    "FetchResponse",
    "GenerateParams",
    "HttpRequest",
    "Model",
    "Request",
    "Response",
    "Tensor",
    "TensorError",
    "devices",
    "emit",
    "fetch",
    "function",
    "http",
]


def emit(chunk: Union[bytes, bytearray, str]) -> None:
    """Streams ``chunk`` to the caller now, ahead of the response.

    A streaming caller (Server-Sent Events, a WebSocket) receives it at
    once; any other caller gets every emitted chunk, in order, followed by
    the response body. ``str`` is sent as UTF-8.
    """
    if _output is None:
        raise Error(
            "unsupported",
            "gust.emit streams the output of a @gust.function; a @gust.http app answers "
            "with its response",
            500,
        )
    data = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
    _output.emit(data)


# The user's handler, set once by `@gust.function` when the app module is
# imported (at build time: componentize-py snapshots the initialised module).
_handler: Optional[Callable[[Request], Any]] = None


def function(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Registers ``handler`` as this component's function.

    Use it on exactly one function per app; the function is returned
    unchanged so it can still be called (and tested) directly.
    """
    global _handler
    if not callable(handler):
        raise TypeError("@gust.function decorates a function taking a gust.Request")
    if _handler is not None and _handler is not handler:
        raise RuntimeError(
            f"@gust.function is used twice ({_name(_handler)} and {_name(handler)}); "
            "an app exports exactly one function"
        )
    _handler = handler
    return handler


def _require_handler() -> None:
    """Fails the build when the app registered nothing (called by the
    generated entry module, so the mistake shows at `gust build`, not at the
    first invocation)."""
    if _handler is None:
        raise RuntimeError(
            "the app defines no function: decorate one with @gust.function "
            "(def handle(req: gust.Request) -> gust.Response | bytes | str | dict), "
            "or serve HTTP with @gust.http (written exactly so, on its own line: "
            "gust build looks for it to pick the component's world)"
        )


def _warm_up_handler(req: Request) -> str:
    """What the build-time warm-up runs instead of the app: the path a
    simple function takes (the body as text, a text response)."""
    return req.text()


def _warm_up() -> None:
    """Calls the export once while componentize-py snapshots the component
    (called by the generated entry module, after ``_require_handler``), with
    an empty request and the SDK's own handler: never the app's, which may
    need the host, absent at build time.

    Every instance starts from that snapshot, so what a call makes on first
    use (the SDK's wrappers and conversions, attribute caches) is already
    made: a fresh instance's call took 0.85x the time, the whole
    invocation 0.95x (``benches/README.md``). The app's handler is put back before the
    snapshot; nothing of the request stays.
    """
    global _handler
    if _types is None:
        return
    app = _handler
    _handler = _warm_up_handler
    try:
        response = Handler().handle(
            _types.Request(
                body=b"",
                content_type="application/octet-stream",
                headers=[],
                invocation_id="",
            )
        )
    finally:
        _handler = app
    if response.status != 200:
        raise RuntimeError(f"gust build: the warm-up call answered {response.status}")


def _require_http_handler() -> None:
    """The same check for a web app's build."""
    from . import web

    if web._http_handler is None:
        raise RuntimeError("the app uses @gust.http but registered no function with it")
    if _handler is not None:
        raise RuntimeError(
            f"the app uses both @gust.function ({_name(_handler)}) and @gust.http "
            f"({_name(web._http_handler)}); a component is one or the other"
        )


def _wit_error(code: str, message: str, status: Optional[int]) -> "_Err[_types.Error]":
    return _Err(_types.Error(code=code, message=message, status=status))


def _exception_error(e: BaseException) -> "_Err[_types.Error]":
    """An uncaught exception as the WIT error: its type, message and
    traceback, because componentize-py would otherwise trap and the user
    would see only `function trapped`."""
    return _wit_error("unhandled-exception", _describe_exception(e, _invoke), 500)


def _invoke(req: _types.Request) -> _types.Response:
    """Runs the registered handler for one WIT request."""
    handler = _handler
    if handler is None:
        raise _wit_error("no-function", "the app registered no @gust.function", 500)
    try:
        request = Request(req.body, req.content_type, req.headers, req.invocation_id)
        response = _to_response(handler(request))
        return _types.Response(
            status=response.status,
            content_type=response.content_type,
            headers=response.headers,
            body=response.body,
        )
    except Error as e:
        raise _wit_error(e.code, e.message, e.status) from None
    except TensorError as e:
        raise _wit_error(f"gpu-{e.code}", e.message, e.status()) from None
    except _Err:
        # Already a WIT error (someone raised the bindings' own Err).
        raise
    except BaseException as e:  # noqa: BLE001 - the point is to catch everything
        # SystemExit and KeyboardInterrupt included: there is no process to
        # exit, and trapping would hide the traceback.
        raise _exception_error(e) from None


class Handler:
    """The export componentize-py calls (``gust:function/handler``).

    The generated entry module re-exports it from the app, so apps never
    name it themselves.
    """

    def handle(self, req: _types.Request) -> _types.Response:
        """Handle one invocation by calling the ``@gust.function``."""
        return _invoke(req)
