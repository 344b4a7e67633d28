// Shared prelude of every Gust CUDA program.
//
// NVRTC compiles each program on its own and we pass it no headers, so the
// backend prepends this text to each .cu file (see `kernel_sources()` in
// cuda/compile.rs). Nothing here may include a CUDA header: half-precision values are
// handled as raw bits so that no cuda_fp16.h / cuda_bf16.h is needed at run
// time, and the conversions mirror the `half` crate bit for bit so that the
// CUDA and CPU backends round identically.
//
// Index arithmetic: the bridge caps every tensor at 2^31 - 1 elements and the
// host caps grids at 65536 blocks of at most 1024 threads, so a 32-bit
// grid-stride index plus its stride never wraps; products that address
// memory are widened to 64 bits.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// GUST_MAX_RANK, the op codes (GUST_RELU, GUST_ADD, GUST_SUM, ...) and the
// dtype codes are not written here: the backend puts `#define`s generated
// from the Rust enums in gpu-bridge/src/kernel.rs in front of every program
// (see `cuda_prelude`), so the numbers exist in one place only.

__device__ __forceinline__ float gust_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ bool gust_isnan(float v) { return v != v; }

// f16 bits -> f32, exact (subnormals normalised, NaN made quiet as `half`
// does).
__device__ __forceinline__ float gust_f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1Fu;
    u32 man = (u32)h & 0x3FFu;
    if (exp == 0x1Fu) {
        if (man == 0u) return __uint_as_float(sign | 0x7F800000u);
        return __uint_as_float(sign | 0x7FC00000u | (man << 13));
    }
    if (exp == 0u) {
        if (man == 0u) return __uint_as_float(sign);
        // man * 2^-24 is exact and a normal f32.
        float v = (float)man * 5.9604644775390625e-8f;
        return __uint_as_float(sign | __float_as_uint(v));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// f32 -> f16 bits, round to nearest even; overflow gives infinity, NaN stays
// NaN (same algorithm as half::f16::from_f32).
__device__ __forceinline__ u16 gust_f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = x & 0x80000000u;
    u32 exp = x & 0x7F800000u;
    u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        u32 nan_bit = (man == 0u) ? 0u : 0x0200u;
        return (u16)((sign >> 16) | 0x7C00u | nan_bit | (man >> 13));
    }
    u32 half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1F) return (u16)(half_sign | 0x7C00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)half_sign;
        u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return (u16)(half_sign | half_man);
    }
    u32 r = half_sign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) r += 1u;
    return (u16)r;
}

// bf16 bits -> f32, exact.
__device__ __forceinline__ float gust_bf16_to_f32(u16 h) {
    u32 x = (u32)h;
    if ((x & 0x7FFFu) > 0x7F80u) x |= 0x0040u;
    return __uint_as_float(x << 16);
}

// f32 -> bf16 bits, round to nearest even (same algorithm as
// half::bf16::from_f32).
__device__ __forceinline__ u16 gust_f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x0040u);
    u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) return (u16)((x >> 16) + 1u);
    return (u16)(x >> 16);
}

// Storage types: compute kernels are written once against these and
// instantiated per dtype; arithmetic always happens in f32 (or f64 for
// accumulators), storage may be narrower.
struct GustF32 {
    typedef float S;
    static __device__ __forceinline__ float load(S v) { return v; }
    static __device__ __forceinline__ S store(float v) { return v; }
};
struct GustF16 {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) { return gust_f16_to_f32(v); }
    static __device__ __forceinline__ S store(float v) { return gust_f32_to_f16(v); }
};
struct GustBF16 {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) { return gust_bf16_to_f32(v); }
    static __device__ __forceinline__ S store(float v) { return gust_f32_to_bf16(v); }
};

// Maximum that propagates NaN (ReduceOp::Max documents "NaN if any element
// is NaN"; fmaxf would drop it).
__device__ __forceinline__ float gust_max_nan(float a, float b) {
    if (gust_isnan(a)) return a;
    if (gust_isnan(b)) return b;
    return a > b ? a : b;
}

// Block-wide reductions. Every thread of the block must call them (they
// synchronise), and every thread gets the result. Block sizes are multiples
// of 32 up to 1024, so there are at most 32 warps.
__device__ __forceinline__ double gust_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float gust_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = gust_max_nan(v, __shfl_down_sync(0xffffffffu, v, o));
    return v;
}

__device__ double gust_block_sum(double v) {
    __shared__ double partial[32];
    __shared__ double total;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 warps = (blockDim.x + 31u) >> 5;
    v = gust_warp_sum(v);
    // The previous call may still be reading `partial` / `total`.
    __syncthreads();
    if (lane == 0u) partial[warp] = v;
    __syncthreads();
    if (warp == 0u) {
        v = lane < warps ? partial[lane] : 0.0;
        v = gust_warp_sum(v);
        if (lane == 0u) total = v;
    }
    __syncthreads();
    return total;
}

__device__ float gust_block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 warps = (blockDim.x + 31u) >> 5;
    v = gust_warp_max(v);
    __syncthreads();
    if (lane == 0u) partial[warp] = v;
    __syncthreads();
    if (warp == 0u) {
        v = lane < warps ? partial[lane] : gust_neg_inf();
        v = gust_warp_max(v);
        if (lane == 0u) total = v;
    }
    __syncthreads();
    return total;
}

// Whether (v, i) beats (best, best_i) for argmax: NaN counts as the maximum
// (as in PyTorch and the CPU backend) and ties go to the lower index, so the
// result is the first maximum whatever order threads combine in.
__device__ __forceinline__ bool gust_argmax_better(float v, u32 i, float best, u32 best_i) {
    const bool vn = gust_isnan(v), bn = gust_isnan(best);
    if (vn || bn) {
        if (vn && bn) return i < best_i;
        return vn;
    }
    if (v > best) return true;
    if (v < best) return false;
    return i < best_i;
}

__device__ __forceinline__ void gust_warp_argmax(float& v, u32& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, v, o);
        u32 oi = __shfl_down_sync(0xffffffffu, i, o);
        if (gust_argmax_better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

__device__ u32 gust_block_argmax(float v, u32 i) {
    __shared__ float partial_v[32];
    __shared__ u32 partial_i[32];
    __shared__ u32 total;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 warps = (blockDim.x + 31u) >> 5;
    gust_warp_argmax(v, i);
    __syncthreads();
    if (lane == 0u) {
        partial_v[warp] = v;
        partial_i[warp] = i;
    }
    __syncthreads();
    if (warp == 0u) {
        v = lane < warps ? partial_v[lane] : gust_neg_inf();
        i = lane < warps ? partial_i[lane] : 0xFFFFFFFFu;
        gust_warp_argmax(v, i);
        if (lane == 0u) total = i;
    }
    __syncthreads();
    return total;
}

#define GUST_GRID_STRIDE(i, n) \
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
