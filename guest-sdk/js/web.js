// Web apps (`export default gust.http(handler)`): a `wasi:http/proxy`
// component served at `/http/{tenant}/{name}/…`, whose handler takes a
// web-standard `Request` and returns a `Response` (the `fetch(request)`
// shape of edge runtimes). `gust build` sees `gust.http(` in the app and
// builds for the `gust:function/http-guest` world.
//
// `gust.Error` answers with its status and an `application/problem+json`
// body; any other uncaught exception answers 500 `unhandled-exception` with
// the stack, as the host's own problems look.

import {
  Fields,
  OutgoingBody,
  OutgoingResponse,
  ResponseOutparam,
} from "wasi:http/types@0.2.12";

const encoder = new TextEncoder();
const MARK = Symbol.for("gust.http");
// Writes of at most this many bytes (`blocking-write-and-flush`'s limit).
const WRITE_CHUNK = 4096;

/** Marks `handler` as the app's web handler: `export default gust.http(handler)`. */
export function http(handler) {
  if (typeof handler !== "function") {
    throw new TypeError("gust.http takes the function that handles a request");
  }
  return { [MARK]: handler };
}

function problem(status, code, detail) {
  return new Response(JSON.stringify({ status, code, detail }), {
    status,
    headers: { "content-type": "application/problem+json" },
  });
}

/** Reads the whole body of a `wasi:http` incoming request. */
function readBody(request) {
  const body = request.consume();
  const stream = body.stream();
  const chunks = [];
  let length = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(65536n);
    } catch (e) {
      if (e && e.payload && e.payload.tag === "closed") break;
      throw e;
    }
    chunks.push(chunk);
    length += chunk.length;
  }
  stream[Symbol.dispose]();
  body[Symbol.dispose]();
  const all = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    all.set(chunk, at);
    at += chunk.length;
  }
  return all;
}

const decoder = new TextDecoder();

/** The web `Request` for a `wasi:http` incoming request. */
function toRequest(incoming) {
  const method = incoming.method();
  const name = method.tag === "other" ? method.val : method.tag.toUpperCase();
  const headers = new Headers();
  for (const [key, value] of incoming.headers().entries()) {
    headers.append(key, decoder.decode(value));
  }
  const authority = incoming.authority() ?? headers.get("host") ?? "localhost";
  const url = `http://${authority}${incoming.pathWithQuery() ?? "/"}`;
  const body = readBody(incoming);
  const hasBody = name !== "GET" && name !== "HEAD";
  return new Request(url, { method: name, headers, body: hasBody ? body : undefined });
}

/** The web `Response` for what the handler returned. */
function toResponse(value) {
  return value instanceof Response
    ? value
    : typeof value === "string"
      ? new Response(value, { headers: { "content-type": "text/plain; charset=utf-8" } })
      : Response.json(value ?? null);
}

/** What a call does in ComponentizeJS's bindings realm (its code for the
 * export and for the `wasi:http` resources), minus the host calls: typed
 * arrays and views over memory, text coding, resource objects, BigInt
 * stream lengths, an await. */
const BINDINGS_WARM_UP = `return (async () => {
  const memory = new Uint8Array(16);
  const view = new DataView(memory.buffer);
  view.setUint32(0, 1, true);
  view.getBigUint64(0, true);
  new TextDecoder().decode(memory.subarray(0, view.getUint32(0, true)));
  new TextEncoder().encodeInto("x", memory);
  const resource = Object.create(Object.prototype);
  Object.defineProperty(resource, Symbol("handle"), { writable: true, value: 1 });
  [[1, 2]].map(([a, b]) => [a, b]);
  await null;
  return 65536n + BigInt(view.getUint8(0));
})();`;

/**
 * The web app's counterpart of `warmUp` (`index.js`), awaited by the module
 * `gust build` generates while ComponentizeJS snapshots the engine. The
 * export itself cannot run at build time (it takes the host's request and
 * response resources), so this runs what a call does around the app without
 * the host: in the bindings realm, whose standard classes resolve lazily
 * (reached through an imported class's `Function` constructor), and in the
 * app's realm, a request read and responses made by the same conversions a
 * call uses. Never the app's handler. A fresh instance's request then took
 * about 0.85× the time (`benches/README.md`).
 */
export async function warmUpWeb() {
  await Fields.constructor(BINDINGS_WARM_UP)();
  const headers = new Headers();
  headers.append("content-type", decoder.decode(encoder.encode("text/plain")));
  const authority = headers.get("host") ?? "localhost";
  const request = new Request(`http://${authority}/warm-up?q=1`, {
    method: "POST",
    headers,
    body: encoder.encode("x"),
  });
  await request.text();
  new URL(request.url).searchParams.get("q");
  for (const value of ["text", { json: true }, problem(400, "warm-up", "")]) {
    const response = toResponse(value);
    new Uint8Array(await response.arrayBuffer());
    [...response.headers].map(([key, text]) => [key, encoder.encode(text)]);
  }
}

/** The `wasi:http/incoming-handler` export for the app's default export
 * (`gust build` generates the module that calls it). */
export function exportIncomingHandler(app, GustError, TensorError, describe) {
  const handler = app && app[MARK];
  if (typeof handler !== "function") {
    throw new TypeError("the app's default export must be gust.http(handler)");
  }
  return {
    async handle(incoming, outparam) {
      let response;
      try {
        let request;
        try {
          request = toRequest(incoming);
        } catch (e) {
          response = problem(400, "invalid-request", `could not read the request: ${e}`);
        }
        if (request !== undefined) {
          response = toResponse(await handler(request));
        }
      } catch (e) {
        if (e instanceof GustError) {
          const status = Number.isInteger(e.status) && e.status >= 400 && e.status <= 599 ? e.status : 500;
          response = problem(status, e.code, e.message);
        } else if (e instanceof TensorError) {
          response = problem(e.status(), `gpu-${e.code}`, e.detail);
        } else {
          const described = describe(e);
          console.error(described);
          response = problem(500, "unhandled-exception", described);
        }
      }
      const bytes = new Uint8Array(await response.arrayBuffer());
      const fields = Fields.fromList(
        [...response.headers].map(([key, value]) => [key, encoder.encode(value)]),
      );
      const outgoing = new OutgoingResponse(fields);
      try {
        outgoing.setStatusCode(response.status);
      } catch {
        outgoing.setStatusCode(500);
      }
      const body = outgoing.body();
      ResponseOutparam.set(outparam, { tag: "ok", val: outgoing });
      const stream = body.write();
      for (let at = 0; at < bytes.length; at += WRITE_CHUNK) {
        stream.blockingWriteAndFlush(bytes.subarray(at, at + WRITE_CHUNK));
      }
      // The stream is a child of the body: dropped before the body ends.
      stream[Symbol.dispose]();
      OutgoingBody.finish(body, undefined);
    },
  };
}
