"""A small web app: routes by method and path, reads query strings, JSON
bodies and headers, and does its arithmetic on the host's device.

    gust deploy examples/python/webapp/app.py --name webapp
    curl -H "Authorization: Bearer $GUST_KEY" $GUST_URL/http/demo/webapp/
    curl -H "Authorization: Bearer $GUST_KEY" "$GUST_URL/http/demo/webapp/hello?name=Ada"
    curl -H "Authorization: Bearer $GUST_KEY" -H 'content-type: application/json' \\
        -d '{"rows": [[1, 2], [3, 4]]}' $GUST_URL/http/demo/webapp/sums

(`gust deploy --public` serves it without a key.) The path the app sees is
the part after `/http/{tenant}/{name}`.
"""

import gust

PAGE = """<!doctype html>
<title>Gust web app</title>
<h1>Hello from Python in a WebAssembly sandbox</h1>
<ul>
  <li><a href="hello?name=Ada">GET hello?name=Ada</a></li>
  <li>POST sums with {"rows": [[1, 2], [3, 4]]}: row sums on the host's device</li>
  <li>GET ratio?a=1&amp;b=0: an error, answered 500 with its traceback</li>
</ul>
"""


def sums(req: gust.HttpRequest) -> dict:
    body = req.json()
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list) or not rows:
        raise gust.Error("invalid-input", 'expected {"rows": [[numbers], ...]}', 400)
    matrix = gust.Tensor.from_list(rows)
    return {"sums": matrix.sum(-1).to_list(), "device": gust.devices()[0].backend}


@gust.http
def app(req: gust.HttpRequest):
    route = (req.method, req.path)
    if route == ("GET", "/"):
        return gust.Response(PAGE, content_type="text/html; charset=utf-8")
    if route == ("GET", "/hello"):
        name = req.param("name") or "world"
        return gust.Response.text(f"Hello, {name}!").with_header("x-greeted", name)
    if route == ("POST", "/sums"):
        return sums(req)
    if route == ("GET", "/ratio"):
        # b=0 raises ZeroDivisionError: the SDK answers 500 with the traceback.
        return {"ratio": float(req.param("a") or 1) / float(req.param("b") or 1)}
    if req.path in ("/", "/hello", "/sums", "/ratio"):
        raise gust.Error("method-not-allowed", f"{req.method} is not served at {req.path}", 405)
    raise gust.Error("not-found", f"nothing at {req.path}", 404)
