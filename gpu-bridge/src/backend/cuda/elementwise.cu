// Elementwise kernels: Unary, Affine, Binary (with broadcasting).
// Prepended with common.cuh.

template <typename D>
__device__ __forceinline__ void gust_unary(const typename D::S* __restrict__ x, typename D::S* __restrict__ out, u32 n,
                                           int op) {
    GUST_GRID_STRIDE(i, n) {
        const float v = D::load(x[i]);
        float r;
        switch (op) {
        case GUST_RELU:
            // `v > 0 ? v : 0` maps NaN to 0, as the CPU backend's f32::max does.
            r = v > 0.0f ? v : 0.0f;
            break;
        case GUST_GELU:
            // 0.5 x (1 + erf(x / sqrt 2)) written with erfc, which keeps its
            // relative accuracy where 1 + erf cancels (large negative x).
            r = 0.5f * v * erfcf(-v * 0.70710678118654752440f);
            break;
        case GUST_SILU:
            r = v / (1.0f + expf(-v));
            break;
        case GUST_TANH:
            r = tanhf(v);
            break;
        default:
            r = expf(v);
            break;
        }
        out[i] = D::store(r);
    }
}

template <typename D>
__device__ __forceinline__ void gust_affine(const typename D::S* __restrict__ x, typename D::S* __restrict__ out, u32 n,
                                            float scale, float offset) {
    // One fused multiply-add, exactly what the CPU backend's f32::mul_add
    // computes, so both backends agree bit for bit.
    GUST_GRID_STRIDE(i, n) { out[i] = D::store(__fmaf_rn(D::load(x[i]), scale, offset)); }
}

// Broadcast layout of a Binary kernel after the host merged contiguous
// dimensions: `shape` of the output and element strides of each operand per
// output dimension (0 = broadcast). Passed by value (100 bytes).
struct GustBinaryLayout {
    u32 rank;
    u32 shape[GUST_MAX_RANK];
    u32 lhs_stride[GUST_MAX_RANK];
    u32 rhs_stride[GUST_MAX_RANK];
};

template <typename D>
__device__ __forceinline__ void gust_binary(const typename D::S* __restrict__ lhs, const typename D::S* __restrict__ rhs,
                                            typename D::S* __restrict__ out, u32 n, GustBinaryLayout layout, int op) {
    GUST_GRID_STRIDE(i, n) {
        u32 rem = i;
        u64 li = 0, ri = 0;
        // Unrolled with constant indices so the layout stays in parameter
        // space instead of being copied to local memory per thread.
#pragma unroll
        for (int d = GUST_MAX_RANK - 1; d >= 0; --d) {
            if ((u32)d < layout.rank) {
                const u32 extent = layout.shape[d];
                const u32 c = rem % extent;
                rem /= extent;
                li += (u64)c * layout.lhs_stride[d];
                ri += (u64)c * layout.rhs_stride[d];
            }
        }
        const float a = D::load(lhs[li]);
        const float b = D::load(rhs[ri]);
        float r;
        // __f*_rn: never contracted into an FMA with anything else.
        switch (op) {
        case GUST_ADD:
            r = __fadd_rn(a, b);
            break;
        case GUST_SUB:
            r = __fsub_rn(a, b);
            break;
        case GUST_MUL:
            r = __fmul_rn(a, b);
            break;
        default:
            r = __fdiv_rn(a, b);
            break;
        }
        out[i] = D::store(r);
    }
}

#define GUST_ELEMENTWISE(SUFFIX, D)                                                                                   \
    extern "C" __global__ void unary_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 n, int op) {   \
        gust_unary<D>(x, out, n, op);                                                                                  \
    }                                                                                                                  \
    extern "C" __global__ void affine_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 n, float scale, \
                                               float offset) {                                                        \
        gust_affine<D>(x, out, n, scale, offset);                                                                      \
    }                                                                                                                  \
    extern "C" __global__ void binary_##SUFFIX(const D::S* __restrict__ lhs, const D::S* __restrict__ rhs,             \
                                               D::S* __restrict__ out, u32 n, GustBinaryLayout layout, int op) {      \
        gust_binary<D>(lhs, rhs, out, n, layout, op);                                                                  \
    }

GUST_ELEMENTWISE(f32, GustF32)
GUST_ELEMENTWISE(f16, GustF16)
GUST_ELEMENTWISE(bf16, GustBF16)
