// Cast between the five dtypes (F32, F16, BF16, I32, U32): one kernel per
// ordered pair, named cast_<from>_<to>. Prepended with common.cuh.
//
// Value-preserving where it can be (Kernel::Cast, as the CPU backend does):
// float -> int truncates toward zero and saturates, NaN -> 0 (Rust's `as`);
// i32 <-> u32 clamps to the target's range rather than keeping the bits;
// int -> float and f32 -> f16/bf16 round once, to nearest even; f16/bf16 ->
// f32 is exact. Float conversions match the `half` crate bit for bit.

__device__ __forceinline__ int gust_sat_i32(float f) {
    if (gust_isnan(f)) return 0;
    if (f >= 2147483648.0f) return 2147483647;
    if (f < -2147483648.0f) return (int)0x80000000u;
    return (int)f;  // cvt.rzi: truncation toward zero
}

__device__ __forceinline__ u32 gust_sat_u32(float f) {
    if (gust_isnan(f)) return 0u;
    if (f >= 4294967296.0f) return 0xFFFFFFFFu;
    if (f <= 0.0f) return 0u;
    return (u32)f;
}

// An integer (exact in f64) to f32 rounded to odd: truncate, then set the
// last bit if anything was cut off. Narrowing that to f16/bf16 with round to
// nearest even then gives the correctly rounded result of the integer
// itself (24 bits >= 11 + 2), where going through a round-to-nearest f32
// would round twice.
__device__ __forceinline__ float gust_round_to_odd(double d) {
    float f = __double2float_rz(d);
    if ((double)f != d) f = __uint_as_float(__float_as_uint(f) | 1u);
    return f;
}

#define GUST_CAST(FROM, TO, SRC_T, DST_T, EXPR)                                                                      \
    extern "C" __global__ void cast_##FROM##_##TO(const SRC_T* __restrict__ x, DST_T* __restrict__ out, u32 n) {      \
        GUST_GRID_STRIDE(i, n) {                                                                                       \
            const SRC_T v = x[i];                                                                                      \
            out[i] = (EXPR);                                                                                           \
        }                                                                                                              \
    }

GUST_CAST(f32, f16, float, u16, gust_f32_to_f16(v))
GUST_CAST(f32, bf16, float, u16, gust_f32_to_bf16(v))
GUST_CAST(f32, i32, float, int, gust_sat_i32(v))
GUST_CAST(f32, u32, float, u32, gust_sat_u32(v))

GUST_CAST(f16, f32, u16, float, gust_f16_to_f32(v))
GUST_CAST(f16, bf16, u16, u16, gust_f32_to_bf16(gust_f16_to_f32(v)))
GUST_CAST(f16, i32, u16, int, gust_sat_i32(gust_f16_to_f32(v)))
GUST_CAST(f16, u32, u16, u32, gust_sat_u32(gust_f16_to_f32(v)))

GUST_CAST(bf16, f32, u16, float, gust_bf16_to_f32(v))
GUST_CAST(bf16, f16, u16, u16, gust_f32_to_f16(gust_bf16_to_f32(v)))
GUST_CAST(bf16, i32, u16, int, gust_sat_i32(gust_bf16_to_f32(v)))
GUST_CAST(bf16, u32, u16, u32, gust_sat_u32(gust_bf16_to_f32(v)))

GUST_CAST(i32, f32, int, float, (float)v)
GUST_CAST(i32, f16, int, u16, gust_f32_to_f16(gust_round_to_odd((double)v)))
GUST_CAST(i32, bf16, int, u16, gust_f32_to_bf16(gust_round_to_odd((double)v)))
GUST_CAST(i32, u32, int, u32, v < 0 ? 0u : (u32)v)

GUST_CAST(u32, f32, u32, float, (float)v)
GUST_CAST(u32, f16, u32, u16, gust_f32_to_f16(gust_round_to_odd((double)v)))
GUST_CAST(u32, bf16, u32, u16, gust_f32_to_bf16(gust_round_to_odd((double)v)))
GUST_CAST(u32, i32, u32, int, v > 0x7FFFFFFFu ? 2147483647 : (int)v)
