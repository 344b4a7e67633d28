// Data movement on raw elements of 4 or 2 bytes, whatever their dtype.
//
// 4-byte kernels move one u32 per invocation. 2-byte elements are packed two
// per u32 word, and WGSL cannot store 16 bits on their own, so 2-byte kernels
// give each invocation one whole output word (two output elements): no two
// invocations ever write the same word.

struct Params {
    // Output elements (concat: elements of the current input).
    len: u32,
    rank: u32,
    // Kernel-specific words, see each kernel.
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    _pad0: u32,
    // Permute: output dims and the matching input strides.
    shape: array<vec4<u32>, 2>,
    strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read> indices: array<u32>;

const WG: u32 = 256u;
// Source index meaning "write zero" (gather out of range).
const NONE: u32 = 0xffffffffu;
const PERMUTE: u32 = 0u;
const SLICE: u32 = 1u;
const GATHER: u32 = 2u;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

fn half_at(i: u32) -> u32 {
    return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

// Input element index that output element `e` copies.
fn source(kind: u32, e: u32) -> u32 {
    switch kind {
        case PERMUTE: {
            var rem = e;
            var s = 0u;
            var d = p.rank;
            while (d > 0u) {
                d = d - 1u;
                let n = p.shape[d / 4u][d % 4u];
                s = s + (rem % n) * p.strides[d / 4u][d % 4u];
                rem = rem / n;
            }
            return s;
        }
        case SLICE: {
            // a = output row (len * inner), b = input row (in_len * inner),
            // c = start * inner.
            return (e / p.a) * p.b + p.c + e % p.a;
        }
        default: {
            // Gather: a = row_len, b = table rows, c = 1 for i32 indices.
            let raw = indices[e / p.a];
            if (p.c == 1u && (raw & 0x80000000u) != 0u) {
                return NONE;
            }
            if (raw >= p.b) {
                return NONE;
            }
            return raw * p.a + e % p.a;
        }
    }
}

fn move4(kind: u32, i: u32) {
    if (i >= p.len) {
        return;
    }
    let s = source(kind, i);
    var v = 0u;
    if (s != NONE) {
        v = src[s];
    }
    out[i] = v;
}

fn move2(kind: u32, w: u32) {
    let e0 = 2u * w;
    if (e0 >= p.len) {
        return;
    }
    var word = 0u;
    for (var h = 0u; h < 2u; h = h + 1u) {
        let e = e0 + h;
        if (e < p.len) {
            let s = source(kind, e);
            if (s != NONE) {
                word = word | (half_at(s) << (16u * h));
            }
        }
    }
    out[w] = word;
}

@compute @workgroup_size(256)
fn permute4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move4(PERMUTE, linear_id(gid, nwg));
}

@compute @workgroup_size(256)
fn permute2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move2(PERMUTE, linear_id(gid, nwg));
}

@compute @workgroup_size(256)
fn slice4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move4(SLICE, linear_id(gid, nwg));
}

@compute @workgroup_size(256)
fn slice2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move2(SLICE, linear_id(gid, nwg));
}

@compute @workgroup_size(256)
fn gather4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move4(GATHER, linear_id(gid, nwg));
}

@compute @workgroup_size(256)
fn gather2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    move2(GATHER, linear_id(gid, nwg));
}

// Concat runs one dispatch per input, which places that input's rows in the
// output: a = output row elements (sum(lens) * inner), b = first element of
// this input's segment within a row, c = segment elements (lens[p] * inner),
// d = outer, e = invocations per row (concat2).

@compute @workgroup_size(256)
fn concat4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    if (t >= p.len) {
        return;
    }
    out[(t / p.c) * p.a + p.b + t % p.c] = src[t];
}

// Segment words can share a word with another input's segment, so each
// invocation rewrites a whole word, keeping the halves that are not this
// input's. wgpu separates dispatches that write one buffer with a barrier,
// so the other inputs' halves are never written concurrently. Invocation
// (row o, q) owns word first(o) + q; a word shared with the previous row's
// segment (only possible when every other input is empty) belongs to the
// previous row's invocation.
fn concat_first_word(o: u32) -> u32 {
    return (o * p.a + p.b) >> 1u;
}

fn concat_last_word(o: u32) -> u32 {
    return (o * p.a + p.b + p.c - 1u) >> 1u;
}

@compute @workgroup_size(256)
fn concat2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_id(gid, nwg);
    let o = t / p.e;
    if (o >= p.d) {
        return;
    }
    let w = concat_first_word(o) + t % p.e;
    if (w > concat_last_word(o)) {
        return;
    }
    if (o > 0u && w == concat_last_word(o - 1u)) {
        return;
    }
    let total = p.d * p.a;
    var word = out[w];
    for (var h = 0u; h < 2u; h = h + 1u) {
        let e = 2u * w + h;
        if (e < total) {
            let row = e / p.a;
            let rr = e % p.a;
            if (rr >= p.b && rr < p.b + p.c) {
                let v = half_at(row * p.c + rr - p.b);
                let shift = 16u * h;
                word = (word & ~(0xffffu << shift)) | (v << shift);
            }
        }
    }
    out[w] = word;
}
