// Write Gust functions in JavaScript (or TypeScript).
//
// A Gust function is a WebAssembly component that exports
// `gust:function/handler`. `gust build app.js` bundles the app with this
// module (esbuild) and turns it into one with ComponentizeJS; the app's
// default export is its function:
//
//     import gust from "gust";
//
//     export default gust.fn(async (req) => `Hello, ${req.text()}!`);
//
// Why `export default gust.fn(…)` and not a decorator or a registration
// call: an ES module's default export is how edge runtimes and bundlers
// name "the thing this module is", it needs no transpiler setting, and
// `gust build` can check at build time that the app has one.
//
// A web app exports `gust.http(async (request) => new Response(…))` instead:
// a web-standard `Request` in, a `Response` out, served at
// `/http/{tenant}/{name}/…` (`web.js`).
//
// The function receives a `Request` and returns (or resolves to) a
// `Response`, a `Uint8Array`/`ArrayBuffer` (application/octet-stream), a
// string (text/plain), any other JSON-serialisable value (application/json)
// or `undefined`/`null` (204, empty). `Tensor` and `Model` reach the host's
// device and resident models (`tensor.js`). Throwing `gust.Error` is a normal,
// recorded outcome that the host answers with an HTTP error; any other
// uncaught exception becomes the error `unhandled-exception` (500) whose
// message carries the exception's name, message and stack, so it shows up in
// the invocation record instead of trapping the instance.

// `gust build` resolves this to `output.js` for a function and to
// `output-web.js` for a web app, whose world has no output stream.
import { emit as emitChunk } from "gust-output";

import { Model, Tensor, TensorError, devices } from "./tensor.js";
import { exportIncomingHandler as webHandler, http, warmUpWeb } from "./web.js";

export { Model, Tensor, TensorError, devices, http, warmUpWeb };

const encoder = new TextEncoder();
const MARK = Symbol.for("gust.fn");

/** A failure the function reports on purpose: the host answers `status`
 * with a problem document carrying `code` and `message`. */
export class GustError extends Error {
  /**
   * @param {string} code stable, machine-readable (e.g. `invalid-input`)
   * @param {string} message for people
   * @param {number} [status] HTTP status, 400..=599 (500 otherwise)
   */
  constructor(code, message, status = 500) {
    super(message);
    this.name = "GustError";
    this.code = String(code);
    this.status = status;
  }
}

/** One invocation's input. */
export class Request {
  /** @param {{body: Uint8Array, contentType: string, headers: [string, string][], invocationId: string}} raw */
  constructor(raw) {
    /** The body, exactly as the caller sent it. */
    this.bytes = raw.body;
    /** Its media type (`application/octet-stream` when the caller named none). */
    this.contentType = raw.contentType;
    /** Caller headers the host passes through, as `[name, value]` pairs in order. */
    this.headers = raw.headers;
    /** The host's id for this invocation (also in the `gust-invocation-id` header). */
    this.invocationId = raw.invocationId;
  }

  /** The first value of header `name` (case-insensitive), or `undefined`. */
  header(name) {
    const wanted = String(name).toLowerCase();
    const found = this.headers.find(([key]) => key.toLowerCase() === wanted);
    return found === undefined ? undefined : found[1];
  }

  /** The body as UTF-8 text; invalid UTF-8 is `invalid-input` (400). */
  text() {
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(this.bytes);
    } catch {
      throw new GustError("invalid-input", "the request body is not UTF-8 text", 400);
    }
  }

  /** The body parsed as JSON; a body that does not parse is `invalid-input` (400). */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new GustError("invalid-input", `the request body is not JSON: ${e.message}`, 400);
    }
  }
}

/** A function's answer. */
export class Response {
  /**
   * @param {Uint8Array | ArrayBuffer | string} body
   * @param {{status?: number, contentType?: string, headers?: [string, string][] | Record<string, string>}} [init]
   */
  constructor(body, init = {}) {
    this.body = toBytes(body);
    this.status = init.status ?? 200;
    this.contentType =
      init.contentType ??
      (typeof body === "string" ? "text/plain; charset=utf-8" : "application/octet-stream");
    const headers = init.headers ?? [];
    this.headers = Array.isArray(headers) ? headers : Object.entries(headers);
  }

  /** A `text/plain; charset=utf-8` response. */
  static text(body, status = 200) {
    return new Response(String(body), { status, contentType: "text/plain; charset=utf-8" });
  }

  /** An `application/json` response holding `value` serialised. */
  static json(value, status = 200) {
    let text;
    try {
      text = JSON.stringify(value);
    } catch (e) {
      throw new GustError("internal-error", `the response is not JSON-serialisable: ${e.message}`, 500);
    }
    if (text === undefined) {
      throw new GustError("internal-error", `a ${typeof value} is not JSON-serialisable`, 500);
    }
    return new Response(text, { status, contentType: "application/json" });
  }

  /** An `application/octet-stream` response. */
  static bytes(body, status = 200) {
    return new Response(toBytes(body), { status, contentType: "application/octet-stream" });
  }
}

function toBytes(body) {
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  return encoder.encode(String(body));
}

/** Sends `chunk` (text or bytes) to a streaming caller now (SSE, WebSocket);
 * other callers get every chunk, in order, before the response body. */
export function emit(chunk) {
  emitChunk(typeof chunk === "string" ? encoder.encode(chunk) : toBytes(chunk));
}

/** Marks `handler` as the app's function: `export default gust.fn(handler)`. */
export function fn(handler) {
  if (typeof handler !== "function") {
    throw new TypeError("gust.fn takes the function that handles a request");
  }
  return { [MARK]: handler };
}

/** The response for whatever the handler returned. */
function toResponse(value) {
  if (value instanceof Response) return value;
  if (value === undefined || value === null) {
    return new Response(new Uint8Array(0), { status: 204 });
  }
  if (value instanceof Uint8Array || value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    return Response.bytes(value);
  }
  if (typeof value === "string") return Response.text(value);
  if (typeof value === "function" || typeof value === "symbol" || typeof value === "bigint") {
    throw new GustError(
      "internal-error",
      `the function returned a ${typeof value}; return a gust.Response, bytes, a string, a JSON value or nothing`,
      500,
    );
  }
  return Response.json(value);
}

/** `Name: message`, a blank line, then the stack (which already names the
 * frames down to where it was thrown). */
function describe(error) {
  if (error instanceof Error) {
    const summary = error.message ? `${error.name}: ${error.message}` : error.name;
    return error.stack ? `${summary}\n\n${error.stack}` : summary;
  }
  let text;
  try {
    text = JSON.stringify(error);
  } catch {
    text = undefined;
  }
  return `uncaught ${typeof error}: ${text ?? String(error)}`;
}

/** A WIT `error` for the host, thrown the way ComponentizeJS returns the
 * `err` case of a `result`. */
function failure(code, message, status) {
  const error = new Error(message);
  error.payload = { code, message, status };
  return error;
}

/** The `gust:function/handler` export for the app's default export
 * (`gust build` generates the module that calls it). */
export function exportHandler(app) {
  const handler = app && app[MARK];
  if (typeof handler !== "function") {
    throw new TypeError("the app's default export must be gust.fn(handler)");
  }
  return {
    async handle(raw) {
      let response;
      try {
        response = toResponse(await handler(new Request(raw)));
      } catch (e) {
        if (e instanceof GustError) {
          const status = Number.isInteger(e.status) && e.status >= 400 && e.status <= 599 ? e.status : 500;
          throw failure(e.code, e.message, status);
        }
        if (e instanceof TensorError) {
          throw failure(`gpu-${e.code}`, e.detail, e.status());
        }
        throw failure("unhandled-exception", describe(e), 500);
      }
      return {
        status: response.status,
        contentType: response.contentType,
        headers: response.headers.map(([name, value]) => [String(name), String(value)]),
        body: response.body,
      };
    },
  };
}

/** What the build-time warm-up runs instead of the app: the path a simple
 * function takes (the body as text, a text response). */
const WARM_UP_APP = fn((req) => Response.text(req.text()));

/** Reaches ComponentizeJS 0.23's bindings for the `handle` export. They are
 * a classic script evaluated in a realm of their own; every imported
 * function (here `emit`) belongs to that realm, so its `Function`
 * constructor compiles code in that realm's global scope, where the
 * bindings' top-level names are. `gust build` accepts only ComponentizeJS
 * 0.23.x, whose bindings use these names. */
const BINDINGS = `return {
  handle: export_handler_0_1_0$handle,
  realloc: $realloc,
  dealloc: $dealloc,
  memory: $memory,
  bind(handle) { handler010Handle = handle; },
};`;

/** Size and alignment of the `handle` export's result area (a
 * `result<response, error>` in the canonical ABI), and where the response's
 * allocated parts lie in it: (pointer offset, length offset, element size,
 * alignment) for the content type, the headers list and the body. */
const RESULT_AREA = { size: 32, align: 4 };
const RESULT_PARTS = [
  [8, 12, 1, 1],
  [16, 20, 16, 4],
  [24, 28, 1, 1],
];

/**
 * Runs the component's `handle` export once while `gust build` makes the
 * component, with a request of the SDK's own and a handler of the SDK's own
 * (never the app's, which may need the host). `gust build` generates the
 * module that awaits this at its top level.
 *
 * Why: ComponentizeJS snapshots SpiderMonkey after the app's top-level code
 * has run (Wizer), and every instance starts from that snapshot. What a
 * module's top level does not touch is made on the first call of every
 * fresh instance: the bindings realm's standard classes (`Promise`,
 * `Uint8Array`, `DataView`, …, resolved lazily there), the async function
 * machinery, the bytecode of self-hosted builtins and of the SDK's and the
 * bindings' functions, object shapes. Made here once, they are in the
 * snapshot: the first call into a fresh instance took 0.45× the time, with
 * half the page faults (`benches/README.md`). Nothing of a request
 * stays behind: the warm-up's allocations are freed and the export is
 * unbound again (ComponentizeJS binds the app's handler after this).
 */
export async function warmUp() {
  let bindings;
  try {
    bindings = emitChunk.constructor(BINDINGS)();
  } catch (e) {
    throw new Error(`gust build: ComponentizeJS's bindings are not the ones this SDK knows (${e})`);
  }
  bindings.bind(exportHandler(WARM_UP_APP).handle);
  const result = bindings.realloc(0, 0, RESULT_AREA.align, RESULT_AREA.size);
  try {
    // Every argument pair is an empty list or string: (pointer, length).
    await bindings.handle(0, 0, 0, 0, 0, 0, 0, 0, result);
  } finally {
    bindings.bind(undefined);
  }
  const view = new DataView(bindings.memory.buffer);
  const tag = view.getUint8(result);
  const status = view.getUint16(result + 4, true);
  if (tag !== 0 || status !== 200) {
    throw new Error(`gust build: the warm-up call answered ${tag === 0 ? status : "an error"}`);
  }
  for (const [pointerAt, lengthAt, size, align] of RESULT_PARTS) {
    const length = view.getUint32(result + lengthAt, true);
    if (length !== 0) {
      bindings.dealloc(view.getUint32(result + pointerAt, true), length * size, align);
    }
  }
  bindings.dealloc(result, RESULT_AREA.size, RESULT_AREA.align);
}

/** The `wasi:http/incoming-handler` export for a web app's default export
 * (`gust build` generates the module that calls it). */
export function exportIncomingHandler(app) {
  return webHandler(app, GustError, TensorError, describe);
}

const gust = { fn, http, emit, Request, Response, Error: GustError, Tensor, Model, TensorError, devices };
export { GustError as Error };
export default gust;
