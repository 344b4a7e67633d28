// Elementwise f32 kernels: unary functions, affine, and broadcasting binary
// ops. One invocation per output element; the host dispatches a 2-D grid of
// 256-wide workgroups so that more than 65535 workgroups fit.
//
// Op codes (GUST_RELU, GUST_ADD, ...) come from a prelude the backend
// generates from the Rust enums in gpu-bridge/src/kernel.rs.

struct Params {
    len: u32,
    op: u32,
    scale: f32,
    offset: f32,
    rank: u32,
    // 1 when both operands are contiguous with the output's shape, which
    // skips the per-element index arithmetic.
    contiguous: u32,
    _pad0: u32,
    _pad1: u32,
    // Ranks up to 8 as two vec4s each: uniform arrays need 16-byte strides.
    shape: array<vec4<u32>, 2>,
    lhs_strides: array<vec4<u32>, 2>,
    rhs_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

const WG: u32 = 256u;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// erfc for z >= 0 (Numerical Recipes `erfcc`, a Chebyshev fit with
// fractional error below 1.2e-7 everywhere). WGSL has no erf, and a
// relative-accuracy erfc keeps GELU accurate for negative inputs where
// 1 + erf(x) cancels.
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    return t * exp(poly);
}

fn gelu(x: f32) -> f32 {
    let c = erfc_pos(abs(x) * 0.70710678118654752);
    // 1 + erf(x / sqrt 2) without cancellation for either sign.
    let one_plus_erf = select(2.0 - c, c, x < 0.0);
    return 0.5 * x * one_plus_erf;
}

// Own tanh: driver tanh is often (e^2x - 1) / (e^2x + 1), which loses
// relative accuracy near 0 and can give NaN for large |x|.
fn tanh_acc(x: f32) -> f32 {
    let ax = abs(x);
    if (ax < 0.625) {
        // Lambert's continued fraction, truncated where the remainder is
        // far below f32 precision for |x| < 0.625.
        let x2 = x * x;
        var t = 15.0;
        t = 13.0 + x2 / t;
        t = 11.0 + x2 / t;
        t = 9.0 + x2 / t;
        t = 7.0 + x2 / t;
        t = 5.0 + x2 / t;
        t = 3.0 + x2 / t;
        t = 1.0 + x2 / t;
        return x / t;
    }
    if (ax > 20.0) {
        return sign(x);
    }
    let e = exp(-2.0 * ax);
    return sign(x) * (1.0 - e) / (1.0 + e);
}

fn unary_op(op: u32, x: f32) -> f32 {
    switch op {
        // max(x, 0) with NaN -> 0, as Rust's f32::max does.
        case GUST_RELU: { return select(0.0, x, x > 0.0); }
        case GUST_GELU: { return gelu(x); }
        case GUST_SILU: { return x / (1.0 + exp(-x)); }
        case GUST_TANH: { return tanh_acc(x); }
        default: { return exp(x); }
    }
}

@compute @workgroup_size(256)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.len) {
        return;
    }
    out[i] = unary_op(p.op, a[i]);
}

@compute @workgroup_size(256)
fn affine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.len) {
        return;
    }
    out[i] = a[i] * p.scale + p.offset;
}

@compute @workgroup_size(256)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.len) {
        return;
    }
    var ai = i;
    var bi = i;
    if (p.contiguous == 0u) {
        ai = 0u;
        bi = 0u;
        var rem = i;
        var d = p.rank;
        while (d > 0u) {
            d = d - 1u;
            let n = p.shape[d / 4u][d % 4u];
            let c = rem % n;
            rem = rem / n;
            ai = ai + c * p.lhs_strides[d / 4u][d % 4u];
            bi = bi + c * p.rhs_strides[d / 4u][d % 4u];
        }
    }
    let x = a[ai];
    let y = b[bi];
    var r: f32;
    switch p.op {
        case GUST_ADD: { r = x + y; }
        case GUST_SUB: { r = x - y; }
        case GUST_MUL: { r = x * y; }
        default: { r = x / y; }
    }
    out[i] = r;
}
