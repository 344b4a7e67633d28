// Host-resident tensors and resident models through the GPU bridge
// (`gust:gpu`). A `Tensor` is a handle: its data stays on the host's device
// between operations, so a chain of ops never copies through the function's
// memory; only `read`, `readF32` and `toArray` copy back.
//
//     const x = gust.Tensor.fromArray([[1, 2, 3]]);
//     const w = gust.Tensor.fromArray([[0.5], [0.25], [1]]);
//     x.matmul(w).relu().toArray();   // [[4]]
//
// Every op checks shapes and dtypes on the host first; a failure throws
// `TensorError`, which an uncaught handler turns into the function error
// `gpu-<code>` with the status a caller can act on.

import * as raw from "gust:gpu/tensors@0.1.0";
import * as layers from "gust:gpu/layers@0.1.0";
import { Model as RawModel } from "gust:gpu/models@0.1.0";

const DTYPES = ["f32", "f16", "bf16", "i32", "u32"];
const FORMATS = ["q4-0", "q4-1", "q8-0", "q4-k", "q6-k"];

// The status a caller can act on, as in the Rust and Python SDKs.
const STATUS = {
  "quota-exceeded": 429,
  forbidden: 403,
  "out-of-memory": 503,
  timeout: 504,
};

/** A bridge call failed: `code` (`shape-mismatch`, …) and `message`. */
export class TensorError extends Error {
  constructor(code, message, busyStatus) {
    super(`${code}: ${message}`);
    this.name = "TensorError";
    this.code = code;
    this.detail = message;
    // Models answer 503 for a full queue instead of 429.
    this.busyStatus = busyStatus;
  }

  /** The HTTP status this failure maps to as a function error. */
  status() {
    if (this.code === "quota-exceeded" && this.busyStatus !== undefined) {
      return this.busyStatus;
    }
    return STATUS[this.code] ?? 500;
  }
}

/** Runs a bridge call, turning its WIT error into a `TensorError`. */
function bridge(call, busyStatus) {
  try {
    return call();
  } catch (e) {
    const payload = e && e.payload;
    if (payload && typeof payload.code === "string") {
      throw new TensorError(payload.code, String(payload.message), busyStatus);
    }
    throw e;
  }
}

function dtypeOf(dtype) {
  const name = String(dtype).toLowerCase();
  if (!DTYPES.includes(name)) {
    throw new TensorError("invalid-argument", `unknown dtype ${JSON.stringify(dtype)}; one of ${DTYPES.join(", ")}`);
  }
  return name;
}

function formatOf(format) {
  const name = String(format).toLowerCase().replace("_", "-");
  if (!FORMATS.includes(name)) {
    throw new TensorError("invalid-argument", `unknown block format ${JSON.stringify(format)}; one of ${FORMATS.join(", ")}`);
  }
  return name;
}

/** Shape and row-major elements of nested arrays of numbers. */
function flatten(values) {
  const shape = [];
  for (let probe = values; Array.isArray(probe); probe = probe[0]) {
    shape.push(probe.length);
    if (probe.length === 0) break;
  }
  const flat = [];
  const walk = (v, depth) => {
    if (depth === shape.length) {
      if (Array.isArray(v)) {
        throw new TensorError("invalid-argument", "ragged nested array: rows differ in depth");
      }
      flat.push(Number(v));
      return;
    }
    if (!Array.isArray(v) || v.length !== shape[depth]) {
      throw new TensorError("invalid-argument", `ragged nested array: expected ${shape[depth]} elements at depth ${depth}`);
    }
    for (const item of v) walk(item, depth + 1);
  };
  walk(values, 0);
  return [shape, flat];
}

function nest(flat, shape) {
  if (shape.length === 0) return flat[0];
  if (shape.length === 1) return Array.from(flat);
  const step = shape.slice(1).reduce((a, b) => a * b, 1);
  const rows = [];
  for (let i = 0; i < shape[0]; i++) {
    rows.push(nest(flat.slice(i * step, (i + 1) * step), shape.slice(1)));
  }
  return rows;
}

/** The devices this invocation may use, the default first
 * (`memoryAvailable` is a BigInt). */
export function devices() {
  return raw.devices();
}

/** A tensor on the host's device. */
export class Tensor {
  /** Wraps a handle of the generated bindings (see `Tensor.fromF32` and
   * friends to make one). */
  constructor(handle) {
    this.raw = handle;
  }

  /** Upload `f32` values with `shape`. */
  static fromF32(shape, values) {
    return new Tensor(bridge(() => raw.Tensor.fromF32(Array.from(shape), Float32Array.from(values))));
  }

  /** Upload `i32` values with `shape` (indices for `gather`). */
  static fromI32(shape, values) {
    return new Tensor(bridge(() => raw.Tensor.fromI32(Array.from(shape), Int32Array.from(values))));
  }

  /** Upload little-endian, row-major `data` as `dtype` with `shape`. */
  static fromBytes(dtype, shape, data) {
    return new Tensor(bridge(() => raw.Tensor.fromBytes(dtypeOf(dtype), Array.from(shape), data)));
  }

  /** Upload ggml blocks (`q4-0`, `q4-1`, `q8-0`, `q4-k`, `q6-k`) exactly as
   * a GGUF file stores them: a weight matrix for `linear`, `gather` and
   * `cast`. */
  static fromBlocks(format, shape, data) {
    return new Tensor(bridge(() => layers.fromBlocks(formatOf(format), Array.from(shape), data)));
  }

  /** A tensor of zeros. */
  static zeros(dtype, shape) {
    return new Tensor(bridge(() => raw.Tensor.zeros(dtypeOf(dtype), Array.from(shape))));
  }

  /** Upload nested arrays of numbers; their nesting is the shape. */
  static fromArray(values, dtype = "f32") {
    const [shape, flat] = flatten(values);
    const kind = dtypeOf(dtype);
    if (kind === "f32") return Tensor.fromF32(shape, flat);
    if (kind === "i32") return Tensor.fromI32(shape, flat);
    return Tensor.fromF32(shape, flat).cast(kind);
  }

  /** Concatenate `tensors` along `dim`. */
  static concat(tensors, dim = 0) {
    return new Tensor(bridge(() => raw.concat(tensors.map((t) => t.raw), dim)));
  }

  /** The tensor's shape. */
  get shape() {
    return Array.from(this.raw.shape());
  }

  /** The tensor's element type (`"f32"`, …). */
  get dtype() {
    return this.raw.dtype();
  }

  /** The block format of a tensor from `fromBlocks`, else `undefined`. */
  get blockFormat() {
    return layers.format(this.raw) ?? undefined;
  }

  /** Copy the data back: little-endian, row-major bytes. */
  read() {
    return bridge(() => this.raw.read());
  }

  /** Copy the data back as a `Float32Array` (cast if needed). */
  readF32() {
    return bridge(() => this.raw.readF32());
  }

  /** Copy the data back as nested arrays shaped like the tensor. */
  toArray() {
    const kind = this.dtype;
    let flat;
    if (kind === "i32" || kind === "u32") {
      const bytes = this.read();
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      flat = [];
      for (let i = 0; i < bytes.byteLength; i += 4) {
        flat.push(kind === "i32" ? view.getInt32(i, true) : view.getUint32(i, true));
      }
    } else {
      flat = Array.from(this.readF32());
    }
    return nest(flat, this.shape);
  }

  op(f, ...args) {
    return new Tensor(bridge(() => f(this.raw, ...args)));
  }

  matmul(other) { return this.op(raw.matmul, other.raw); }
  add(other) { return typeof other === "number" ? this.affine(1, other) : this.op(raw.add, other.raw); }
  sub(other) { return typeof other === "number" ? this.affine(1, -other) : this.op(raw.sub, other.raw); }
  mul(other) { return typeof other === "number" ? this.affine(other, 0) : this.op(raw.mul, other.raw); }
  div(other) { return typeof other === "number" ? this.affine(1 / other, 0) : this.op(raw.div, other.raw); }
  /** `x * scale + offset`, elementwise. */
  affine(scale, offset) { return this.op(raw.affine, scale, offset); }
  relu() { return this.op(raw.relu); }
  gelu() { return this.op(raw.gelu); }
  silu() { return this.op(raw.silu); }
  tanh() { return this.op(raw.tanh); }
  exp() { return this.op(raw.exp); }
  softmax(dim = -1) { return this.op(raw.softmax, dim); }
  layerNorm(weight, bias, eps = 1e-5) { return this.op(raw.layerNorm, weight?.raw, bias?.raw, eps); }
  rmsNorm(weight, eps = 1e-6) { return this.op(raw.rmsNorm, weight?.raw, eps); }
  sum(dim = -1, keepDim = false) { return this.op(raw.sum, dim, keepDim); }
  mean(dim = -1, keepDim = false) { return this.op(raw.mean, dim, keepDim); }
  max(dim = -1, keepDim = false) { return this.op(raw.max, dim, keepDim); }
  argmax(dim = -1, keepDim = false) { return this.op(raw.argmax, dim, keepDim); }
  transpose(dim0 = -2, dim1 = -1) { return this.op(raw.transpose, dim0, dim1); }
  permute(dims) { return this.op(raw.permute, Array.from(dims)); }
  reshape(shape) { return this.op(raw.reshape, Array.from(shape, (d) => BigInt(d))); }
  slice(dim, start, length) { return this.op(raw.slice, dim, start, length); }
  gather(indices) { return this.op(raw.gather, indices.raw); }
  cast(to) { return this.op(raw.cast, dtypeOf(to)); }
  /** `x · wᵀ` for each weight matrix, side by side in the last dimension. */
  linear(...weights) { return this.op(layers.linear, weights.map((w) => w.raw)); }
  /** `silu(x[..., :n]) · x[..., n:]` for `x` of `[..., 2n]`. */
  swiglu() { return this.op(layers.swiglu); }
}

// A full model queue is transient (the host answers with Retry-After), so
// unlike a tensor quota it maps to 503.
const BUSY = 503;

/** Settings for `Model.generate`: greedy decoding of up to 128 tokens
 * unless told otherwise. */
function generateParams(settings = {}) {
  return {
    maxTokens: settings.maxTokens ?? 128,
    temperature: settings.temperature ?? 0,
    topK: settings.topK,
    topP: settings.topP,
    seed: settings.seed === undefined ? undefined : BigInt(settings.seed),
    stop: Array.from(settings.stop ?? [], String),
  };
}

/** A model resident on the host's device. */
export class Model {
  constructor(handle) {
    this.raw = handle;
  }

  /** Load the model called `name` or find it resident; the tenant's policy
   * must list it (`forbidden` otherwise). */
  static load(name) {
    return new Model(bridge(() => RawModel.load(String(name)), BUSY));
  }

  /** The model's name. */
  get name() {
    return this.raw.name();
  }

  /** The model family, e.g. `bert` or `llama`. */
  get family() {
    return this.raw.family();
  }

  /** Sentence embeddings: one L2-normalised vector (an array) per text. */
  embed(texts) {
    const list = typeof texts === "string" ? [texts] : Array.from(texts, String);
    return bridge(() => this.raw.embed(list), BUSY).map((v) => Array.from(v));
  }

  /** Continue `prompt`; `settings`: `maxTokens`, `temperature`, `topK`,
   * `topP`, `seed`, `stop`. */
  generate(prompt, settings) {
    return bridge(() => this.raw.generate(String(prompt), generateParams(settings)), BUSY);
  }

  /** Like `generate`, and each piece of text also goes to the caller as it
   * is produced (see `gust.emit`). */
  generateStream(prompt, settings) {
    return bridge(() => this.raw.generateStream(String(prompt), generateParams(settings)), BUSY);
  }

  /** Run the model on named input tensors (`{name: Tensor}`); returns named
   * outputs. */
  run(inputs) {
    const outputs = bridge(
      () => this.raw.run(Object.entries(inputs).map(([name, t]) => [name, t.raw])),
      BUSY,
    );
    return Object.fromEntries(outputs.map(([name, t]) => [name, new Tensor(t)]));
  }
}
