// Types of the `gust` package (see index.js for what each does).

/** A failure the function reports on purpose: answered with `status` and a
 * problem document carrying `code` and `message`. */
export declare class GustError extends Error {
  constructor(code: string, message: string, status?: number);
  readonly code: string;
  readonly status: number;
}
export { GustError as Error };

/** One invocation's input. */
export declare class Request {
  /** The body, exactly as the caller sent it. */
  readonly bytes: Uint8Array;
  /** Its media type (`application/octet-stream` when none was named). */
  readonly contentType: string;
  /** Caller headers the host passes through, as `[name, value]` pairs. */
  readonly headers: ReadonlyArray<[string, string]>;
  /** The host's id for this invocation. */
  readonly invocationId: string;
  /** The first value of header `name` (case-insensitive). */
  header(name: string): string | undefined;
  /** The body as UTF-8 text; otherwise `invalid-input` (400). */
  text(): string;
  /** The body parsed as JSON; otherwise `invalid-input` (400). */
  json<T = unknown>(): T;
}

export interface ResponseInit {
  status?: number;
  contentType?: string;
  headers?: Array<[string, string]> | Record<string, string>;
}

/** A function's answer. */
export declare class Response {
  constructor(body: Uint8Array | ArrayBuffer | string, init?: ResponseInit);
  readonly body: Uint8Array;
  readonly status: number;
  readonly contentType: string;
  readonly headers: Array<[string, string]>;
  static text(body: string, status?: number): Response;
  static json(value: unknown, status?: number): Response;
  static bytes(body: Uint8Array | ArrayBuffer, status?: number): Response;
}

/** What a handler may return: a `Response`, bytes, text, a JSON value or
 * nothing (204). */
export type Returned =
  | Response
  | Uint8Array
  | ArrayBuffer
  | string
  | number
  | boolean
  | null
  | undefined
  | object;

/** The app's function, as `export default gust.fn(handler)` makes it. */
export interface GustFunction {
  readonly [mark: symbol]: (req: Request) => Returned | Promise<Returned>;
}

/** Marks `handler` as the app's function. */
export declare function fn(handler: (req: Request) => Returned | Promise<Returned>): GustFunction;

/** Sends `chunk` to a streaming caller now. */
export declare function emit(chunk: string | Uint8Array): void;

/** Used by the module `gust build` generates; not for apps. */
export declare function exportHandler(app: GustFunction): unknown;

declare const gust: {
  fn: typeof fn;
  emit: typeof emit;
  Request: typeof Request;
  Response: typeof Response;
  Error: typeof GustError;
};
export default gust;
