// A JavaScript web app: a web-standard Request in, a Response out, served
// at /http/{tenant}/{name}/… (the `fetch(request)` shape of edge runtimes).
//
//     gust deploy examples/js/webapp/app.js --name webapp-js --public
//     curl "$GUST_URL/http/demo/webapp-js/hello?name=Ada"
import gust from "gust";

export default gust.http(async (request) => {
  const url = new URL(request.url);
  const route = url.pathname.split("/").pop();
  switch (route) {
    case "hello":
      return `Hello, ${url.searchParams.get("name") ?? "world"}!`;
    case "echo":
      return new Response(await request.text(), {
        headers: { "content-type": request.headers.get("content-type") ?? "text/plain", "x-method": request.method },
      });
    case "json":
      return { method: request.method, path: url.pathname, query: Object.fromEntries(url.searchParams) };
    case "refuse":
      throw new gust.Error("invalid-input", "the app refuses this", 422);
    case "raise":
      throw new RangeError("the app failed on purpose");
    default:
      return new Response("not here", { status: 404 });
  }
});
