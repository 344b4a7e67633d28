"""What every kind of Gust app shares: requests, responses, errors.

Nothing here imports the bindings of either world (``gust:function/guest``
for ``@gust.function``, ``gust:function/http-guest`` for ``@gust.http``),
so both kinds of app can use it.
"""

from __future__ import annotations

import json as _json
import traceback as _traceback
from typing import Any, Callable, List, Optional, Tuple, Union

# The error code `Request.text` and `Request.json` use for a body they
# cannot decode: the caller's fault, so status 400.
_INVALID_INPUT = "invalid-input"


def _find_header(headers: List[Tuple[str, str]], name: str) -> Optional[str]:
    """The value of the first of ``headers`` called ``name``, compared
    case-insensitively, or ``None``."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


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
        return _find_header(self.headers, name)

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


def _name(f: Any) -> str:
    return getattr(f, "__qualname__", None) or repr(f)


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


def _describe_exception(e: BaseException, caller: Callable[..., Any]) -> str:
    """``Type: message``, a blank line, then the traceback, starting below
    ``caller`` (the SDK's own frame that called the app: noise to the user)."""
    kind = type(e).__qualname__
    module = type(e).__module__
    if module not in ("builtins", "__main__"):
        kind = f"{module}.{kind}"
    tb = e.__traceback__
    if tb is not None and tb.tb_frame.f_code is caller.__code__:
        tb = tb.tb_next
    trace = "".join(_traceback.format_exception(type(e), e, tb))
    text = str(e)
    summary = f"{kind}: {text}" if text else kind
    return f"{summary}\n\n{trace}"
