"""Outgoing HTTP(S) requests from a function (``wasi:http/outgoing-handler``),
to where the tenant's policy allows (``outbound_http``)::

    import os
    import gust

    @gust.function
    def handle(req: gust.Request) -> str:
        reply = gust.fetch(
            "https://api.example.com/v1/echo",
            method="POST",
            headers={"authorization": f"Bearer {os.environ['API_TOKEN']}"},
            body=req.body,
            timeout=5,
        )
        return reply.text()

The call blocks the function (not the host) until the response and its
body have arrived. A refused or failed request raises :class:`FetchError`,
a :class:`gust.Error` (code ``fetch-failed``, 502) that the function may
catch or let through.
"""

from __future__ import annotations

import json as _json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._base import Error, _find_header

try:
    # Imported when the app is loaded (not at the first call): componentize-py
    # bundles the binding modules the app imports while it is pre-initialised.
    from componentize_py_types import Err as _Err
    from wit_world.imports import outgoing_handler as _handler
    from wit_world.imports import streams as _streams
    from wit_world.imports import wasi_http_types as _http
except ImportError:  # plain Python, outside a component build
    _Err = _handler = _streams = _http = None  # type: ignore[assignment]

# Writes go out in pieces of at most 4096 bytes per the stream contract.
_WRITE_CHUNK = 4096
_READ_CHUNK = 64 * 1024

Headers = Union[Mapping[str, str], Sequence[Tuple[str, str]]]


class FetchError(Error):
    """A request that got no response: refused by the tenant's policy, or
    failed on the way (DNS, connection, TLS, timeouts). ``reason`` is the
    ``wasi:http`` error code (``HttpRequestDenied``,
    ``TlsCertificateError``, ``ConnectionTimeout``…)."""

    def __init__(self, request: str, reason: str) -> None:
        super().__init__("fetch-failed", f"{request}: {reason}", 502)
        self.reason = reason


class FetchResponse:
    """A response, its body read whole."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        return _find_header(self.headers, name)

    def text(self) -> str:
        """The body as UTF-8 text (``invalid-response``, 502, if it is not)."""
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Error("invalid-response", f"the response body is not UTF-8: {e}", 502) from None

    def json(self) -> Any:
        """The body parsed as JSON (``invalid-response``, 502, if it is not)."""
        try:
            return _json.loads(self.text())
        except ValueError as e:
            raise Error("invalid-response", f"the response body is not JSON: {e}", 502) from None


def _split_url(url: str) -> Tuple[str, str, str]:
    """``(scheme, authority, path_with_query)`` of an http(s) URL."""
    for scheme in ("https", "http"):
        prefix = f"{scheme}://"
        if url.startswith(prefix):
            rest = url[len(prefix) :]
            break
    else:
        raise ValueError("not an http:// or https:// URL")
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    if not authority or "@" in authority:
        raise ValueError("the URL has no host")
    tail = tail.split("#", 1)[0]
    if not tail.startswith("/"):
        tail = "/" + tail
    return scheme, authority, tail


def _header_list(headers: Optional[Headers]) -> List[Tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return [(str(k), str(v)) for k, v in headers.items()]
    return [(str(k), str(v)) for k, v in headers]


def _nanos(seconds: float) -> int:
    return max(0, int(seconds * 1_000_000_000))


def _reason(code: Any) -> str:
    """A ``wasi:http`` error code as a short name: ``ErrorCode_DnsTimeout``
    reads ``DnsTimeout``, with its payload when it has one."""
    name = type(code).__name__
    name = name[len("ErrorCode_") :] if name.startswith("ErrorCode_") else name
    value = getattr(code, "value", None)
    return f"{name} ({value})" if value is not None else name


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Optional[Headers] = None,
    body: Union[bytes, str, None] = None,
    timeout: Optional[float] = None,
    connect_timeout: Optional[float] = None,
) -> FetchResponse:
    """Sends ``method url`` with ``headers`` and ``body`` and reads the
    whole response. ``timeout`` (seconds) bounds the wait for the response
    head and then for each piece of the body, ``connect_timeout`` the
    connection (TLS included); by default only the call's deadline does.

    Raises :class:`FetchError` when the request is refused or fails.
    """
    if _http is None:
        raise FetchError(f"{method} {url}", "outgoing requests need a component (gust build)")
    Err = _Err
    method = method.upper()
    line = f"{method} {url}"
    try:
        scheme, authority, path = _split_url(url)
    except ValueError as e:
        raise FetchError(line, str(e)) from None
    data = body.encode("utf-8") if isinstance(body, str) else (body or b"")
    try:
        fields = _http.Fields.from_list(
            [(name, value.encode("latin-1")) for name, value in _header_list(headers)]
        )
    except (Err, UnicodeEncodeError) as e:
        raise FetchError(line, f"invalid headers: {e}") from None
    request = _http.OutgoingRequest(fields)
    methods = {
        "GET": _http.Method_Get,
        "HEAD": _http.Method_Head,
        "POST": _http.Method_Post,
        "PUT": _http.Method_Put,
        "DELETE": _http.Method_Delete,
        "OPTIONS": _http.Method_Options,
        "PATCH": _http.Method_Patch,
    }
    try:
        request.set_method(methods[method]() if method in methods else _http.Method_Other(method))
        request.set_scheme(_http.Scheme_Https() if scheme == "https" else _http.Scheme_Http())
        request.set_authority(authority)
        request.set_path_with_query(path)
    except Err:
        raise FetchError(line, "invalid method, host or path") from None
    options = None
    if timeout is not None or connect_timeout is not None:
        options = _http.RequestOptions()
        if connect_timeout is not None:
            options.set_connect_timeout(_nanos(connect_timeout))
        if timeout is not None:
            options.set_first_byte_timeout(_nanos(timeout))
            options.set_between_bytes_timeout(_nanos(timeout))
    outgoing = request.body()
    try:
        pending = _handler.handle(request, options)
    except Err as e:
        raise FetchError(line, _reason(e.value)) from None
    stream = outgoing.write()
    try:
        for start in range(0, len(data), _WRITE_CHUNK):
            stream.blocking_write_and_flush(data[start : start + _WRITE_CHUNK])
    except Err as e:
        raise FetchError(line, f"sending the body: {e.value}") from None
    # A child resource goes before its parent.
    stream.__exit__(None, None, None)
    try:
        _http.OutgoingBody.finish(outgoing, None)
    except Err as e:
        raise FetchError(line, _reason(e.value)) from None
    pending.subscribe().block()
    got = pending.get()
    if got is None or isinstance(got, Err):
        raise FetchError(line, "no response")
    answer = got.value
    if isinstance(answer, Err):
        raise FetchError(line, _reason(answer.value))
    response = answer.value
    status = response.status()
    header_list = [(name, value.decode("latin-1")) for name, value in response.headers().entries()]
    incoming = response.consume()
    reader = incoming.stream()
    chunks = []
    while True:
        try:
            chunks.append(reader.blocking_read(_READ_CHUNK))
        except Err as e:
            if isinstance(e.value, _streams.StreamError_Closed):
                break
            raise FetchError(line, "the response body failed") from None
    reader.__exit__(None, None, None)
    _http.IncomingBody.finish(incoming).__exit__(None, None, None)
    return FetchResponse(status, header_list, b"".join(chunks))
