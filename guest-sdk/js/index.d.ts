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

/** The app's web handler, as `export default gust.http(handler)` makes it. */
export interface GustHttp {
  readonly [mark: symbol]: (request: globalThis.Request) => unknown;
}

/** Marks `handler` as a web app: a web-standard `Request` in, a `Response`
 * (or text, or a JSON value) out, served at `/http/{tenant}/{name}/…`. */
export declare function http(
  handler: (request: globalThis.Request) => globalThis.Response | string | object | Promise<globalThis.Response | string | object>,
): GustHttp;

/** Sends `chunk` to a streaming caller now. */
export declare function emit(chunk: string | Uint8Array): void;

/** Used by the module `gust build` generates; not for apps. */
export declare function exportHandler(app: GustFunction): unknown;

/** Used by the module `gust build` generates (the build-time warm-up of the
 * snapshot every instance starts from); not for apps. */
export declare function warmUp(): Promise<void>;

/** The same for a web app's module; not for apps. */
export declare function warmUpWeb(): Promise<void>;

export type Dtype = "f32" | "f16" | "bf16" | "i32" | "u32";
export type BlockFormat = "q4-0" | "q4-1" | "q8-0" | "q4-k" | "q6-k";

/** A bridge call failed: `code` (`shape-mismatch`, …) and `detail`. An
 * uncaught one is the function error `gpu-<code>`. */
export declare class TensorError extends Error {
  readonly code: string;
  readonly detail: string;
  /** The HTTP status this failure maps to as a function error. */
  status(): number;
}

export interface DeviceInfo {
  backend: string;
  name: string;
  isGpu: boolean;
  memoryAvailable: bigint;
}

/** The devices this invocation may use, the default first. */
export declare function devices(): DeviceInfo[];

type Nested = number | Nested[];

/** A tensor on the host's device. */
export declare class Tensor {
  static fromF32(shape: ArrayLike<number>, values: ArrayLike<number>): Tensor;
  static fromI32(shape: ArrayLike<number>, values: ArrayLike<number>): Tensor;
  static fromBytes(dtype: Dtype, shape: ArrayLike<number>, data: Uint8Array): Tensor;
  static fromBlocks(format: BlockFormat, shape: ArrayLike<number>, data: Uint8Array): Tensor;
  static zeros(dtype: Dtype, shape: ArrayLike<number>): Tensor;
  static fromArray(values: Nested, dtype?: Dtype): Tensor;
  static concat(tensors: Tensor[], dim?: number): Tensor;
  readonly shape: number[];
  readonly dtype: Dtype;
  readonly blockFormat: BlockFormat | undefined;
  read(): Uint8Array;
  readF32(): Float32Array;
  toArray(): Nested;
  matmul(other: Tensor): Tensor;
  add(other: Tensor | number): Tensor;
  sub(other: Tensor | number): Tensor;
  mul(other: Tensor | number): Tensor;
  div(other: Tensor | number): Tensor;
  affine(scale: number, offset: number): Tensor;
  relu(): Tensor;
  gelu(): Tensor;
  silu(): Tensor;
  tanh(): Tensor;
  exp(): Tensor;
  softmax(dim?: number): Tensor;
  layerNorm(weight?: Tensor, bias?: Tensor, eps?: number): Tensor;
  rmsNorm(weight?: Tensor, eps?: number): Tensor;
  sum(dim?: number, keepDim?: boolean): Tensor;
  mean(dim?: number, keepDim?: boolean): Tensor;
  max(dim?: number, keepDim?: boolean): Tensor;
  argmax(dim?: number, keepDim?: boolean): Tensor;
  transpose(dim0?: number, dim1?: number): Tensor;
  permute(dims: ArrayLike<number>): Tensor;
  reshape(shape: ArrayLike<number>): Tensor;
  slice(dim: number, start: number, length: number): Tensor;
  gather(indices: Tensor): Tensor;
  cast(to: Dtype): Tensor;
  linear(...weights: Tensor[]): Tensor;
  swiglu(): Tensor;
}

export interface GenerateSettings {
  maxTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number | bigint;
  stop?: string[];
}

/** A model resident on the host's device. */
export declare class Model {
  static load(name: string): Model;
  readonly name: string;
  readonly family: string;
  embed(texts: string | string[]): number[][];
  generate(prompt: string, settings?: GenerateSettings): string;
  generateStream(prompt: string, settings?: GenerateSettings): string;
  run(inputs: Record<string, Tensor>): Record<string, Tensor>;
}

declare const gust: {
  fn: typeof fn;
  http: typeof http;
  emit: typeof emit;
  Request: typeof Request;
  Response: typeof Response;
  Error: typeof GustError;
  Tensor: typeof Tensor;
  Model: typeof Model;
  TensorError: typeof TensorError;
  devices: typeof devices;
};
export default gust;
