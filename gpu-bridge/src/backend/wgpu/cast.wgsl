// Casts between f32, f16, bf16, i32 and u32, done on bit patterns with
// integer arithmetic only: WGSL leaves float-to-f16 rounding, overflow and
// denormal handling to the implementation, and these must match Rust's `as`
// and the `half` crate exactly.
//
// Every cast converts the value, saturating at the target's range, as the CPU
// backend does: float -> int truncates (NaN -> 0), i32 <-> u32 clamps rather
// than reinterpreting bits, int -> float rounds to nearest even once.
//
// 2-byte values are packed two per u32 word. cast4 writes one 4-byte element
// per invocation; cast2 writes one whole output word (two 2-byte elements)
// per invocation so that no two invocations share a word.

struct Params {
    len: u32,
    // Dtype codes: GUST_F32, GUST_F16, ... (generated from kernel.rs).
    src_type: u32,
    dst_type: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

const WG: u32 = 256u;

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

fn is_nan_bits(x: u32) -> bool {
    return (x & 0x7fffffffu) > 0x7f800000u;
}

// Exact widening of an f16 to f32 bits.
fn f16_to_f32(h: u32) -> u32 {
    let sgn = (h & 0x8000u) << 16u;
    let ex = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (ex == 0x1fu) {
        return sgn | 0x7f800000u | (man << 13u);
    }
    if (ex == 0u) {
        if (man == 0u) {
            return sgn;
        }
        // Subnormal man * 2^-24, renormalised around its leading bit.
        let lead = firstLeadingBit(man);
        return sgn | ((lead + 103u) << 23u) | ((man << (23u - lead)) & 0x7fffffu);
    }
    return sgn | ((ex + 112u) << 23u) | (man << 13u);
}

// f32 bits to f16 bits, round to nearest even; overflow gives infinity, NaN
// stays NaN (quiet, top payload bits kept), as the `half` crate does.
fn f32_to_f16(x: u32) -> u32 {
    let sgn = (x >> 16u) & 0x8000u;
    let ex = (x >> 23u) & 0xffu;
    let man = x & 0x7fffffu;
    if (ex == 0xffu) {
        if (man == 0u) {
            return sgn | 0x7c00u;
        }
        return sgn | 0x7e00u | (man >> 13u);
    }
    let e = i32(ex) - 127;
    if (e > 15) {
        return sgn | 0x7c00u;
    }
    if (e >= -14) {
        let m = man >> 13u;
        let rem = man & 0x1fffu;
        var r = (u32(e + 15) << 10u) | m;
        // A carry out of the mantissa correctly bumps the exponent, up to
        // infinity.
        if (rem > 0x1000u || (rem == 0x1000u && (m & 1u) == 1u)) {
            r = r + 1u;
        }
        return sgn | r;
    }
    if (e < -25) {
        return sgn;
    }
    // f16 subnormal: count units of 2^-24 in (man | 2^23) * 2^(e - 23).
    let full = man | 0x800000u;
    let s = u32(-(e + 1));
    var m = full >> s;
    let rem = full & ((1u << s) - 1u);
    let halfway = 1u << (s - 1u);
    if (rem > halfway || (rem == halfway && (m & 1u) == 1u)) {
        m = m + 1u;
    }
    return sgn | m;
}

// f32 bits to bf16 bits, round to nearest even, NaN kept quiet.
fn f32_to_bf16(x: u32) -> u32 {
    if (is_nan_bits(x)) {
        return (x >> 16u) | 0x40u;
    }
    return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
}

// An integer magnitude to f32 bits. With `odd`, rounds to odd instead of to
// nearest even: a 24-bit round-to-odd intermediate makes the later rounding
// to f16 / bf16 as exact as rounding the integer directly.
fn mag_to_f32(u: u32, odd: bool) -> u32 {
    if (u == 0u) {
        return 0u;
    }
    let lead = firstLeadingBit(u);
    if (lead <= 23u) {
        return ((lead + 127u) << 23u) | ((u << (23u - lead)) & 0x7fffffu);
    }
    let s = lead - 23u;
    var m = u >> s;
    let rem = u & ((1u << s) - 1u);
    if (odd) {
        if (rem != 0u) {
            m = m | 1u;
        }
    } else {
        let halfway = 1u << (s - 1u);
        if (rem > halfway || (rem == halfway && (m & 1u) == 1u)) {
            m = m + 1u;
        }
    }
    // m carries the implicit bit (2^23), so adding it lands a rounding carry
    // (m = 2^24) in the exponent.
    return ((lead + 126u) << 23u) + m;
}

fn int_to_f32(v: u32, is_signed: bool, odd: bool) -> u32 {
    if (is_signed && (v & 0x80000000u) != 0u) {
        return 0x80000000u | mag_to_f32(~v + 1u, odd);
    }
    return mag_to_f32(v, odd);
}

// Truncating, saturating float-to-int on f32 bits (NaN -> 0), as Rust's `as`.
fn f32_to_i32(x: u32) -> u32 {
    if (is_nan_bits(x)) {
        return 0u;
    }
    let neg = (x & 0x80000000u) != 0u;
    let e = i32((x >> 23u) & 0xffu) - 127;
    if (e < 0) {
        return 0u;
    }
    if (e >= 31) {
        return select(0x7fffffffu, 0x80000000u, neg);
    }
    let full = (x & 0x7fffffu) | 0x800000u;
    var mag: u32;
    if (e >= 23) {
        mag = full << u32(e - 23);
    } else {
        mag = full >> u32(23 - e);
    }
    return select(mag, ~mag + 1u, neg);
}

fn f32_to_u32(x: u32) -> u32 {
    if (is_nan_bits(x)) {
        return 0u;
    }
    let e = i32((x >> 23u) & 0xffu) - 127;
    if (e < 0) {
        return 0u;
    }
    if ((x & 0x80000000u) != 0u) {
        return 0u;
    }
    if (e >= 32) {
        return 0xffffffffu;
    }
    let full = (x & 0x7fffffu) | 0x800000u;
    if (e >= 23) {
        return full << u32(e - 23);
    }
    return full >> u32(23 - e);
}

// Input element i as stored: a u32 word for 4-byte types, 16 bits for 2-byte.
fn load(i: u32) -> u32 {
    if (p.src_type == GUST_F16 || p.src_type == GUST_BF16) {
        return (src[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
    }
    return src[i];
}

// Float input as f32 bits (exact for every float type).
fn float_bits(v: u32) -> u32 {
    switch p.src_type {
        case GUST_F16: { return f16_to_f32(v); }
        case GUST_BF16: { return v << 16u; }
        default: { return v; }
    }
}

fn convert(v: u32) -> u32 {
    let from_int = p.src_type == GUST_I32 || p.src_type == GUST_U32;
    let is_signed = p.src_type == GUST_I32;
    switch p.dst_type {
        case GUST_F32: {
            if (from_int) {
                return int_to_f32(v, is_signed, false);
            }
            return float_bits(v);
        }
        case GUST_F16: {
            if (from_int) {
                return f32_to_f16(int_to_f32(v, is_signed, true));
            }
            return f32_to_f16(float_bits(v));
        }
        case GUST_BF16: {
            if (from_int) {
                return f32_to_bf16(int_to_f32(v, is_signed, true));
            }
            return f32_to_bf16(float_bits(v));
        }
        case GUST_I32: {
            // Only u32 reaches here among the integers; it saturates.
            if (from_int) {
                return min(v, 0x7fffffffu);
            }
            return f32_to_i32(float_bits(v));
        }
        default: {
            // Only i32 reaches here among the integers: negatives give 0.
            if (from_int) {
                return select(v, 0u, (v & 0x80000000u) != 0u);
            }
            return f32_to_u32(float_bits(v));
        }
    }
}

@compute @workgroup_size(256)
fn cast4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.len) {
        return;
    }
    out[i] = convert(load(i));
}

@compute @workgroup_size(256)
fn cast2(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = linear_id(gid, nwg);
    let e0 = 2u * w;
    if (e0 >= p.len) {
        return;
    }
    var word = convert(load(e0));
    if (e0 + 1u < p.len) {
        word = word | (convert(load(e0 + 1u)) << 16u);
    }
    out[w] = word;
}
