"""Unit tests of the SDK's pure-Python parts, against the real bindings
componentize-py generates (`componentize-py bindings`; their host calls only
work inside a component, so nothing here calls the host).

Run by the host tests (`host/tests/all/python.rs`) once per world, with the
bindings on PYTHONPATH and GUST_WORLD naming the world (`guest` or
`http-guest`).
"""

import io
import json
import os
import unittest
from contextlib import redirect_stderr

import gust
from gust import web
from gust.tensor import TensorError, _flatten, _nest

WEB_WORLD = os.environ.get("GUST_WORLD") == "http-guest"


class RequestTests(unittest.TestCase):
    def test_text_and_json_decode_or_answer_400(self):
        req = gust.Request(b'{"a": [1, 2]}', "application/json")
        self.assertEqual(req.json(), {"a": [1, 2]})
        self.assertEqual(req.text(), '{"a": [1, 2]}')
        for body, method in ((b"\xff", "text"), (b"{nope", "json")):
            with self.assertRaises(gust.Error) as raised:
                getattr(gust.Request(body), method)()
            self.assertEqual((raised.exception.code, raised.exception.status), ("invalid-input", 400))

    def test_headers_are_found_case_insensitively(self):
        req = gust.Request(headers=[("X-Op", "one"), ("x-op", "two")])
        self.assertEqual(req.header("x-OP"), "one")
        self.assertIsNone(req.header("missing"))


class ResponseTests(unittest.TestCase):
    def test_return_values_become_responses(self):
        cases = [
            ("hi", 200, "text/plain; charset=utf-8", b"hi"),
            (b"\x00\x01", 200, "application/octet-stream", b"\x00\x01"),
            ({"a": 1}, 200, "application/json", b'{"a":1}'),
            ([1, "x"], 200, "application/json", b'[1,"x"]'),
            (None, 204, "application/octet-stream", b""),
        ]
        for value, status, content_type, body in cases:
            response = gust._to_response(value)
            self.assertEqual((response.status, response.content_type, response.body), (status, content_type, body))
        kept = gust.Response.text("made", status=201).with_header("x-a", "1")
        self.assertIs(gust._to_response(kept), kept)
        self.assertEqual(kept.headers, [("x-a", "1")])

    def test_what_cannot_be_a_response_is_the_functions_error(self):
        with self.assertRaises(gust.Error) as raised:
            gust._to_response(object())
        self.assertEqual((raised.exception.code, raised.exception.status), ("internal-error", 500))
        with self.assertRaises(gust.Error) as raised:
            gust.Response.json({"x": {1, 2}})
        self.assertIn("could not serialise", raised.exception.message)


def _raise_below():
    raise ValueError("deep down")


def _sdk_frame(f):
    # Stands in for the SDK's frame that calls the app and catches.
    try:
        f()
    except ValueError as e:
        return gust._describe_exception(e, _sdk_frame)
    raise AssertionError("nothing was raised")


class ExceptionTests(unittest.TestCase):
    def test_the_description_has_type_message_and_the_apps_frames_only(self):
        described = _sdk_frame(_raise_below)
        self.assertTrue(described.startswith("ValueError: deep down\n\nTraceback"), described)
        self.assertIn("in _raise_below", described)
        self.assertNotIn("in _sdk_frame", described)


class TensorHelperTests(unittest.TestCase):
    def test_nested_lists_flatten_row_major_and_nest_back(self):
        shape, flat = _flatten([[1, 2, 3], [4, 5, 6]])
        self.assertEqual((shape, flat), ([2, 3], [1, 2, 3, 4, 5, 6]))
        self.assertEqual(_nest(flat, shape), [[1, 2, 3], [4, 5, 6]])
        self.assertEqual(_flatten(7), ([], [7]))

    def test_ragged_lists_are_refused(self):
        for ragged in ([[1, 2], [3]], [[1, 2], 3], [1, [2]]):
            with self.assertRaises(TensorError) as raised:
                _flatten(ragged)
            self.assertEqual(raised.exception.code, "invalid-argument")
            self.assertEqual(raised.exception.status(), 500)

    def test_statuses_follow_the_rust_sdk(self):
        self.assertEqual(TensorError("quota-exceeded", "x").status(), 429)
        self.assertEqual(TensorError("quota-exceeded", "x", busy_status=503).status(), 503)
        self.assertEqual(TensorError("forbidden", "x").status(), 403)
        self.assertEqual(TensorError("timeout", "x").status(), 504)


class WebTests(unittest.TestCase):
    def test_query_parameters(self):
        req = gust.HttpRequest("GET", "/search", "q=a+b&tag=x&tag=y&empty=")
        self.assertEqual(req.param("q"), "a b")
        self.assertEqual(req.query_params()["tag"], ["x", "y"])
        self.assertEqual(req.param("empty"), "")
        self.assertIsNone(req.param("missing"))

    def test_errors_become_problem_documents(self):
        def refuse(req):
            raise gust.Error("not-found", f"nothing at {req.path}", 404)

        def odd_status(req):
            raise gust.Error("teapot", "short and stout", 299)

        def crash(req):
            return 1 / 0

        answer = web._serve(refuse, gust.HttpRequest(path="/x"))
        problem = json.loads(answer.body)
        self.assertEqual((answer.status, answer.content_type), (404, "application/problem+json"))
        self.assertEqual((problem["code"], problem["detail"], problem["status"]), ("not-found", "nothing at /x", 404))
        self.assertEqual(web._serve(odd_status, gust.HttpRequest()).status, 500)
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            crashed = web._serve(crash, gust.HttpRequest())
        problem = json.loads(crashed.body)
        self.assertEqual((crashed.status, problem["code"]), (500, "unhandled-exception"))
        self.assertTrue(problem["detail"].startswith("ZeroDivisionError"), problem["detail"])
        self.assertIn("in crash", problem["detail"])
        self.assertNotIn("in _serve", problem["detail"])
        # The traceback also goes to stderr, which the invocation record keeps.
        self.assertIn("ZeroDivisionError", stderr.getvalue())

    def test_return_values_are_those_of_functions(self):
        self.assertEqual(web._serve(lambda req: {"ok": True}, gust.HttpRequest()).body, b'{"ok":true}')


class RegistrationTests(unittest.TestCase):
    def tearDown(self):
        gust._handler = None
        web._http_handler = None

    def test_one_function_per_app(self):
        def one(req):
            return "1"

        def two(req):
            return "2"

        self.assertIs(gust.function(one), one)
        gust.function(one)
        with self.assertRaises(RuntimeError):
            gust.function(two)
        gust._require_handler()

    def test_the_warm_up_never_runs_the_apps_handler_and_puts_it_back(self):
        calls = []

        def app(req):
            calls.append(req)
            return "app"

        gust.function(app)
        gust._warm_up()
        self.assertEqual(calls, [])
        self.assertIs(gust._handler, app)
        if not WEB_WORLD:
            # What the warm-up ran, the SDK's own handler, answers as a
            # function would.
            self.assertEqual(gust._warm_up_handler(gust.Request(b"hi")), "hi")

    def test_a_component_is_a_function_or_a_web_app(self):
        with self.assertRaises(RuntimeError) as raised:
            gust._require_handler()
        self.assertIn("@gust.http", str(raised.exception))
        with self.assertRaises(RuntimeError):
            gust._require_http_handler()
        gust.http(lambda req: "web")
        gust._require_http_handler()
        gust.function(lambda req: "function")
        with self.assertRaises(RuntimeError) as raised:
            gust._require_http_handler()
        self.assertIn("both", str(raised.exception))


class FetchTests(unittest.TestCase):
    def test_urls_split_into_scheme_authority_and_path(self):
        from gust.fetch import _split_url

        self.assertEqual(
            _split_url("https://api.example.com:8443/v1/x?q=1#frag"),
            ("https", "api.example.com:8443", "/v1/x?q=1"),
        )
        self.assertEqual(_split_url("http://h?q"), ("http", "h", "/?q"))
        for bad in ("ftp://h/x", "https://", "api.example.com/x", "https://u@h/"):
            with self.assertRaises(ValueError):
                _split_url(bad)

    def test_responses_and_errors(self):
        reply = gust.FetchResponse(200, [("Content-Type", "application/json")], b'{"ok": 1}')
        self.assertEqual(reply.header("content-type"), "application/json")
        self.assertEqual(reply.json(), {"ok": 1})
        with self.assertRaises(gust.Error) as raised:
            gust.FetchResponse(200, [], b"\xff").text()
        self.assertEqual((raised.exception.code, raised.exception.status), ("invalid-response", 502))
        error = gust.FetchError("GET https://x", "HttpRequestDenied")
        self.assertIsInstance(error, gust.Error)
        self.assertEqual((error.code, error.status, error.reason), ("fetch-failed", 502, "HttpRequestDenied"))
        self.assertIn("GET https://x: HttpRequestDenied", error.message)

    def test_the_bindings_fetch_uses_are_in_both_worlds(self):
        # The names `gust.fetch` imports inside a component: both worlds
        # import wasi:http/outgoing-handler.
        from wit_world.imports import outgoing_handler, streams, wasi_http_types as http

        self.assertTrue(callable(outgoing_handler.handle))
        self.assertTrue(hasattr(streams, "StreamError_Closed"))
        for name in ("Method_Get", "Method_Post", "Method_Other", "Scheme_Https", "Scheme_Http",
                     "RequestOptions", "OutgoingRequest", "OutgoingBody", "IncomingBody", "Fields"):
            self.assertTrue(hasattr(http, name), name)
        from gust.fetch import _reason

        self.assertEqual(_reason(http.ErrorCode_HttpRequestDenied()), "HttpRequestDenied")
        self.assertEqual(_reason(http.ErrorCode_ConnectionTimeout()), "ConnectionTimeout")


@unittest.skipUnless(WEB_WORLD, "the web app's world only")
class WebWorldTests(unittest.TestCase):
    def test_emit_is_refused_in_a_web_app(self):
        with self.assertRaises(gust.Error) as raised:
            gust.emit("chunk")
        self.assertEqual(raised.exception.code, "unsupported")

    def test_methods_are_named_in_upper_case(self):
        from wit_world.imports import wasi_http_types as http

        self.assertEqual(web._method_name(http.Method_Get()), "GET")
        self.assertEqual(web._method_name(http.Method_Patch()), "PATCH")
        self.assertEqual(web._method_name(http.Method_Other("purge")), "PURGE")

    def test_the_export_is_a_wasi_http_incoming_handler(self):
        from wit_world import exports

        handler = web._handler_class()
        # A Protocol, not runtime-checkable: look at the class's bases.
        self.assertIn(exports.IncomingHandler, handler.__mro__)
        self.assertTrue(callable(handler().handle))


if __name__ == "__main__":
    unittest.main()
