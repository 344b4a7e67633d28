// Row normalisations: LayerNorm and RmsNorm, one block per row.
// Prepended with common.cuh.
//
// Statistics accumulate in f64 and the per-element affine step runs in f64
// too: rows are read two or three times anyway, so the kernels stay memory
// bound, and the result is the correctly rounded f32 of a near-exact value.
// `weight` / `bias` are null when the kernel has no such operand.

template <typename D>
__device__ __forceinline__ void gust_layer_norm(const typename D::S* __restrict__ x,
                                                const typename D::S* __restrict__ weight,
                                                const typename D::S* __restrict__ bias, typename D::S* __restrict__ out,
                                                u32 rows, u32 cols, float eps) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const typename D::S* row = x + (u64)r * cols;
        typename D::S* out_row = out + (u64)r * cols;
        double s = 0.0;
        for (u32 j = threadIdx.x; j < cols; j += blockDim.x) s += (double)D::load(row[j]);
        const double mean = gust_block_sum(s) / (double)cols;
        // Two passes (mean first, then squared deviations): the one-pass
        // E[x^2] - E[x]^2 form cancels badly when |mean| >> std.
        double q = 0.0;
        for (u32 j = threadIdx.x; j < cols; j += blockDim.x) {
            const double d = (double)D::load(row[j]) - mean;
            q += d * d;
        }
        const double var = gust_block_sum(q) / (double)cols;
        const double inv = 1.0 / sqrt(var + (double)eps);
        for (u32 j = threadIdx.x; j < cols; j += blockDim.x) {
            double y = ((double)D::load(row[j]) - mean) * inv;
            if (weight) y *= (double)D::load(weight[j]);
            if (bias) y += (double)D::load(bias[j]);
            out_row[j] = D::store((float)y);
        }
    }
}

template <typename D>
__device__ __forceinline__ void gust_rms_norm(const typename D::S* __restrict__ x,
                                              const typename D::S* __restrict__ weight, typename D::S* __restrict__ out,
                                              u32 rows, u32 cols, float eps) {
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const typename D::S* row = x + (u64)r * cols;
        typename D::S* out_row = out + (u64)r * cols;
        double q = 0.0;
        for (u32 j = threadIdx.x; j < cols; j += blockDim.x) {
            const double v = (double)D::load(row[j]);
            q += v * v;
        }
        const double mean_square = gust_block_sum(q) / (double)cols;
        const double inv = 1.0 / sqrt(mean_square + (double)eps);
        for (u32 j = threadIdx.x; j < cols; j += blockDim.x) {
            double y = (double)D::load(row[j]) * inv;
            if (weight) y *= (double)D::load(weight[j]);
            out_row[j] = D::store((float)y);
        }
    }
}

#define GUST_NORM(SUFFIX, D)                                                                                          \
    extern "C" __global__ void layer_norm_##SUFFIX(const D::S* __restrict__ x, const D::S* __restrict__ weight,       \
                                                   const D::S* __restrict__ bias, D::S* __restrict__ out, u32 rows,   \
                                                   u32 cols, float eps) {                                             \
        gust_layer_norm<D>(x, weight, bias, out, rows, cols, eps);                                                     \
    }                                                                                                                  \
    extern "C" __global__ void rms_norm_##SUFFIX(const D::S* __restrict__ x, const D::S* __restrict__ weight,         \
                                                 D::S* __restrict__ out, u32 rows, u32 cols, float eps) {             \
        gust_rms_norm<D>(x, weight, out, rows, cols, eps);                                                             \
    }

GUST_NORM(f32, GustF32)
GUST_NORM(f16, GustF16)
GUST_NORM(bf16, GustBF16)
