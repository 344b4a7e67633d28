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

Host-resident tensors are :class:`Tensor` and resident models are
:class:`Model`; neither needs numpy.
"""

from __future__ import annotations

import json as _json
import traceback as _traceback
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

from componentize_py_types import Err as _Err
from wit_world.imports import gust_function_types as _types
from wit_world.imports import output as _output

from .model import GenerateParams, Model
from .tensor import Dtype, Tensor, TensorError, devices

__all__ = [
    "Dtype",
    "Error",
    "GenerateParams",
    "Model",
    "Request",
    "Response",
    "Tensor",
    "TensorError",
    "devices",
    "emit",
    "function",
]

# The error code `Request.text` and `Request.json` use for a body they
# cannot decode: the caller's fault, so status 400.
_INVALID_INPUT = "invalid-input"


class Error(Exception):
    """A failure the function reports on purpose.

    ``code`` is a stable, machine-readable code (``invalid-input``);
    ``message`` explains it; ``status`` is the HTTP status the host answers
    with (500 when ``None``; values outside 400..=599 count as 500).
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Request:
    """One invocation's input.

    ``body`` is the raw bytes the caller sent, ``content_type`` its media
    type, ``headers`` the pass-through headers as ``(name, value)`` pairs in
    order, and ``invocation_id`` the host's id for this call.
    """

    __slots__ = ("body", "content_type", "headers", "invocation_id")

    def __init__(
        self,
        body: bytes = b"",
        content_type: str = "application/octet-stream",
        headers: Optional[List[Tuple[str, str]]] = None,
        invocation_id: str = "",
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers if headers is not None else []
        self.invocation_id = invocation_id

    def text(self) -> str:
        """The body as UTF-8 text; invalid UTF-8 is ``invalid-input`` (400)."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Error(_INVALID_INPUT, f"request body is not valid UTF-8: {e}", 400) from None

    def json(self) -> Any:
        """The body parsed as JSON; a body that does not parse is
        ``invalid-input`` (400)."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as e:
            raise Error(_INVALID_INPUT, f"request body is not valid JSON: {e}", 400) from None

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name``, compared case-insensitively."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def __repr__(self) -> str:
        return (
            f"Request(content_type={self.content_type!r}, {len(self.body)} bytes, "
            f"invocation_id={self.invocation_id!r})"
        )


class Response:
    """A successful invocation's output.

    Build one directly or with :meth:`text`, :meth:`json` or :meth:`bytes`.
    """

    __slots__ = ("status", "content_type", "headers", "body")

    def __init__(
        self,
        body: Union[bytes, bytearray, str] = b"",
        status: int = 200,
        content_type: str = "application/octet-stream",
        headers: Optional[List[Tuple[str, str]]] = None,
    ) -> None:
        self.body = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        self.status = status
        self.content_type = content_type
        self.headers = list(headers) if headers is not None else []

    @classmethod
    def text(cls, body: str, status: int = 200) -> "Response":
        """A ``text/plain; charset=utf-8`` response."""
        return cls(body, status, "text/plain; charset=utf-8")

    @classmethod
    def json(cls, value: Any, status: int = 200) -> "Response":
        """An ``application/json`` response holding ``value`` serialised.

        A value ``json`` cannot serialise is ``internal-error`` (500): it is
        the function's bug, and the message names what failed.
        """
        try:
            body = _json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise Error("internal-error", f"could not serialise the response as JSON: {e}", 500) from None
        return cls(body, status, "application/json")

    @classmethod
    def bytes(cls, body: Union[bytes, bytearray], status: int = 200) -> "Response":
        """An ``application/octet-stream`` response."""
        return cls(body, status, "application/octet-stream")

    def with_header(self, name: str, value: str) -> "Response":
        """Adds a response header (earlier ones with the same name stay)."""
        self.headers.append((name, value))
        return self

    def __repr__(self) -> str:
        return f"Response(status={self.status}, content_type={self.content_type!r}, {len(self.body)} bytes)"


def emit(chunk: Union[bytes, bytearray, str]) -> None:
    """Streams ``chunk`` to the caller now, ahead of the response.

    A streaming caller (Server-Sent Events, a WebSocket) receives it at
    once; any other caller gets every emitted chunk, in order, followed by
    the response body. ``str`` is sent as UTF-8.
    """
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


def _name(f: Any) -> str:
    return getattr(f, "__qualname__", None) or repr(f)


def _require_handler() -> None:
    """Fails the build when the app registered nothing (called by the
    generated entry module, so the mistake shows at `gust build`, not at the
    first invocation)."""
    if _handler is None:
        raise RuntimeError(
            "the app defines no function: decorate one with @gust.function "
            "(def handle(req: gust.Request) -> gust.Response | bytes | str | dict)"
        )


def _to_response(value: Any) -> Response:
    """The WIT response for whatever the handler returned."""
    if isinstance(value, Response):
        return value
    if value is None:
        return Response(b"", 204, "application/octet-stream")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Response.bytes(bytes(value))
    if isinstance(value, str):
        return Response.text(value)
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        return Response.json(value)
    raise Error(
        "internal-error",
        f"the function returned a {type(value).__name__}; return gust.Response, bytes, "
        "str, a dict or list (JSON) or None",
        500,
    )


def _wit_error(code: str, message: str, status: Optional[int]) -> "_Err[_types.Error]":
    return _Err(_types.Error(code=code, message=message, status=status))


def _exception_error(e: BaseException) -> "_Err[_types.Error]":
    """An uncaught exception as the WIT error: its type, message and
    traceback, because componentize-py would otherwise trap and the user
    would see only `function trapped`."""
    kind = type(e).__qualname__
    module = type(e).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    tb = e.__traceback__
    # The first frame is the SDK's own call of the handler: noise to the user.
    if tb is not None and tb.tb_frame.f_code is _invoke.__code__:
        tb = tb.tb_next
    trace = "".join(_traceback.format_exception(type(e), e, tb))
    text = str(e)
    summary = f"{kind}: {text}" if text else kind
    return _wit_error("unhandled-exception", f"{summary}\n\n{trace}", 500)


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
