// Row-wise f32 kernels: reductions, softmax, layer norm and RMS norm.
//
// Each comes in two forms. `*_rows` gives every row to one invocation and
// accumulates sequentially: cheap for short rows, which are the common case
// with many rows. `*_wg` gives every row to one 64-invocation workgroup that
// accumulates strided partials and combines them with a tree, which keeps
// long rows both fast and accurate. The host picks by row length.
//
// Reduce and softmax rows are strided: the input is viewed as
// [outer, len, inner] and row r = (o, i) holds x[o, 0..len, i]. Norm rows
// are contiguous runs of `len` (= cols) elements, so there inner = 1.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    // Reduce: GUST_SUM, GUST_MEAN, GUST_MAX or GUST_ARGMAX (generated from
    // kernel.rs).
    op: u32,
    // Norms: bit 0 = weight present, bit 1 = bias present.
    flags: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Written as bits so that argmax can store u32 indices through the same
// binding (storing an index through an f32 could flush it as a denormal).
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const WG: u32 = 256u;
const RWG: u32 = 64u;

var<workgroup> sv: array<f32, 64>;
var<workgroup> si: array<u32, 64>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// A bit test, because drivers may assume float comparisons never see NaN.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// max that propagates NaN (WGSL's max may return either operand).
fn nan_max(a: f32, b: f32) -> f32 {
    if (is_nan(a)) {
        return a;
    }
    if (is_nan(b)) {
        return b;
    }
    return max(a, b);
}

// Whether candidate (v, i) replaces the current best (bv, bi) for argmax:
// NaN ranks above every number, and ties go to the lower index.
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    let vn = is_nan(v);
    let bn = is_nan(bv);
    if (vn || bn) {
        return vn && (!bn || i < bi);
    }
    return v > bv || (v == bv && i < bi);
}

fn strided_base(r: u32) -> u32 {
    let o = r / p.inner;
    let i = r % p.inner;
    return o * p.len * p.inner + i;
}

fn store_f32(i: u32, v: f32) {
    out[i] = bitcast<u32>(v);
}

// Tree combines over the 64 partials of a workgroup. Called from uniform
// control flow; the trailing barrier lets the scratch be reused at once.
fn tree_sum(lid: u32, v: f32) -> f32 {
    sv[lid] = v;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            sv[lid] = sv[lid] + sv[lid + s];
        }
        workgroupBarrier();
    }
    let r = sv[0];
    workgroupBarrier();
    return r;
}

fn tree_max(lid: u32, v: f32) -> f32 {
    sv[lid] = v;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            sv[lid] = nan_max(sv[lid], sv[lid + s]);
        }
        workgroupBarrier();
    }
    let r = sv[0];
    workgroupBarrier();
    return r;
}

fn tree_argmax(lid: u32, v: f32, i: u32) -> u32 {
    sv[lid] = v;
    si[lid] = i;
    workgroupBarrier();
    for (var s = RWG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s && beats(sv[lid + s], si[lid + s], sv[lid], si[lid])) {
            sv[lid] = sv[lid + s];
            si[lid] = si[lid + s];
        }
        workgroupBarrier();
    }
    let r = si[0];
    workgroupBarrier();
    return r;
}

// ---- reduce -------------------------------------------------------------

@compute @workgroup_size(256)
fn reduce_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_id(gid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = strided_base(r);
    if (p.op == GUST_ARGMAX) {
        var bv = x[base];
        var bi = 0u;
        for (var j = 1u; j < p.len; j = j + 1u) {
            let v = x[base + j * p.inner];
            if (beats(v, j, bv, bi)) {
                bv = v;
                bi = j;
            }
        }
        out[r] = bi;
    } else if (p.op == GUST_MAX) {
        var m = x[base];
        for (var j = 1u; j < p.len; j = j + 1u) {
            m = nan_max(m, x[base + j * p.inner]);
        }
        store_f32(r, m);
    } else {
        var s = 0.0;
        for (var j = 0u; j < p.len; j = j + 1u) {
            s = s + x[base + j * p.inner];
        }
        if (p.op == GUST_MEAN) {
            s = s / f32(p.len);
        }
        store_f32(r, s);
    }
}

@compute @workgroup_size(64)
fn reduce_wg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let base = strided_base(r);
    if (p.op == GUST_ARGMAX) {
        var bv = neg_inf();
        var bi = 0xffffffffu;
        for (var j = lid; j < p.len; j = j + RWG) {
            let v = x[base + j * p.inner];
            if (beats(v, j, bv, bi)) {
                bv = v;
                bi = j;
            }
        }
        let best = tree_argmax(lid, bv, bi);
        if (lid == 0u) {
            out[r] = best;
        }
    } else if (p.op == GUST_MAX) {
        var m = neg_inf();
        for (var j = lid; j < p.len; j = j + RWG) {
            m = nan_max(m, x[base + j * p.inner]);
        }
        let best = tree_max(lid, m);
        if (lid == 0u) {
            store_f32(r, best);
        }
    } else {
        var s = 0.0;
        for (var j = lid; j < p.len; j = j + RWG) {
            s = s + x[base + j * p.inner];
        }
        var total = tree_sum(lid, s);
        if (p.op == GUST_MEAN) {
            total = total / f32(p.len);
        }
        if (lid == 0u) {
            store_f32(r, total);
        }
    }
}

// ---- softmax ------------------------------------------------------------

@compute @workgroup_size(256)
fn softmax_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_id(gid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = strided_base(r);
    var m = x[base];
    for (var j = 1u; j < p.len; j = j + 1u) {
        m = nan_max(m, x[base + j * p.inner]);
    }
    var s = 0.0;
    for (var j = 0u; j < p.len; j = j + 1u) {
        s = s + exp(x[base + j * p.inner] - m);
    }
    let inv = 1.0 / s;
    for (var j = 0u; j < p.len; j = j + 1u) {
        let k = base + j * p.inner;
        store_f32(k, exp(x[k] - m) * inv);
    }
}

@compute @workgroup_size(64)
fn softmax_wg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let base = strided_base(r);
    var m = neg_inf();
    for (var j = lid; j < p.len; j = j + RWG) {
        m = nan_max(m, x[base + j * p.inner]);
    }
    let row_max = tree_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < p.len; j = j + RWG) {
        s = s + exp(x[base + j * p.inner] - row_max);
    }
    let inv = 1.0 / tree_sum(lid, s);
    for (var j = lid; j < p.len; j = j + RWG) {
        let k = base + j * p.inner;
        store_f32(k, exp(x[k] - row_max) * inv);
    }
}

// ---- norms --------------------------------------------------------------

fn affine_out(k: u32, c: u32, v: f32) {
    var y = v;
    if ((p.flags & 1u) != 0u) {
        y = y * weight[c];
    }
    if ((p.flags & 2u) != 0u) {
        y = y + bias[c];
    }
    store_f32(k, y);
}

@compute @workgroup_size(256)
fn layer_norm_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_id(gid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.len;
    var s = 0.0;
    for (var c = 0u; c < p.len; c = c + 1u) {
        s = s + x[base + c];
    }
    let mean = s / f32(p.len);
    // Two passes: the variance of centred values does not cancel.
    var q = 0.0;
    for (var c = 0u; c < p.len; c = c + 1u) {
        let d = x[base + c] - mean;
        q = q + d * d;
    }
    let inv = 1.0 / sqrt(q / f32(p.len) + p.eps);
    for (var c = 0u; c < p.len; c = c + 1u) {
        affine_out(base + c, c, (x[base + c] - mean) * inv);
    }
}

@compute @workgroup_size(64)
fn layer_norm_wg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.len;
    var s = 0.0;
    for (var c = lid; c < p.len; c = c + RWG) {
        s = s + x[base + c];
    }
    let mean = tree_sum(lid, s) / f32(p.len);
    var q = 0.0;
    for (var c = lid; c < p.len; c = c + RWG) {
        let d = x[base + c] - mean;
        q = q + d * d;
    }
    let inv = 1.0 / sqrt(tree_sum(lid, q) / f32(p.len) + p.eps);
    for (var c = lid; c < p.len; c = c + RWG) {
        affine_out(base + c, c, (x[base + c] - mean) * inv);
    }
}

@compute @workgroup_size(256)
fn rms_norm_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = linear_id(gid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.len;
    var q = 0.0;
    for (var c = 0u; c < p.len; c = c + 1u) {
        let v = x[base + c];
        q = q + v * v;
    }
    let inv = 1.0 / sqrt(q / f32(p.len) + p.eps);
    for (var c = 0u; c < p.len; c = c + 1u) {
        affine_out(base + c, c, x[base + c] * inv);
    }
}

@compute @workgroup_size(64)
fn rms_norm_wg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.len;
    var q = 0.0;
    for (var c = lid; c < p.len; c = c + RWG) {
        let v = x[base + c];
        q = q + v * v;
    }
    let inv = 1.0 / sqrt(tree_sum(lid, q) / f32(p.len) + p.eps);
    for (var c = lid; c < p.len; c = c + RWG) {
        affine_out(base + c, c, x[base + c] * inv);
    }
}
