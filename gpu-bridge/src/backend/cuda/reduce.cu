// Reductions and softmax over the middle axis of [outer, len, inner].
// Prepended with common.cuh.
//
// Two layouts per kernel, chosen by the host (`reduce_by_rows` in cuda/launch.rs):
// - `_rows`: one block per output (o, i); the block's threads stride over
//   the `len` axis and combine with warp shuffles + shared memory. Used when
//   inner == 1 (contiguous rows) or when there are few outputs.
// - `_cols`: one thread per output (o, i), looping over `len`; neighbouring
//   threads read neighbouring `i`, so loads coalesce when inner is large.
// Sums accumulate in f64: the kernels are memory bound, and an f32 running
// sum over long rows would lose digits the 1e-5 accuracy contract needs.

template <typename D>
__device__ __forceinline__ void gust_reduce_rows(const typename D::S* __restrict__ x, typename D::S* __restrict__ out,
                                                 u32 outer, u32 len, u32 inner, int op) {
    const u32 outputs = outer * inner;
    for (u32 r = blockIdx.x; r < outputs; r += gridDim.x) {
        const u32 o = r / inner, i = r % inner;
        const typename D::S* base = x + (u64)o * len * inner + i;
        if (op == GUST_MAX) {
            float m = gust_neg_inf();
            for (u32 j = threadIdx.x; j < len; j += blockDim.x) m = gust_max_nan(m, D::load(base[(u64)j * inner]));
            m = gust_block_max(m);
            if (threadIdx.x == 0) out[r] = D::store(m);
        } else {
            double s = 0.0;
            for (u32 j = threadIdx.x; j < len; j += blockDim.x) s += (double)D::load(base[(u64)j * inner]);
            s = gust_block_sum(s);
            if (threadIdx.x == 0) out[r] = D::store((float)(op == GUST_MEAN ? s / (double)len : s));
        }
    }
}

template <typename D>
__device__ __forceinline__ void gust_reduce_cols(const typename D::S* __restrict__ x, typename D::S* __restrict__ out,
                                                 u32 outer, u32 len, u32 inner, int op) {
    GUST_GRID_STRIDE(r, outer * inner) {
        const u32 o = r / inner, i = r % inner;
        const typename D::S* base = x + (u64)o * len * inner + i;
        if (op == GUST_MAX) {
            float m = gust_neg_inf();
            for (u32 j = 0; j < len; ++j) m = gust_max_nan(m, D::load(base[(u64)j * inner]));
            out[r] = D::store(m);
        } else {
            double s = 0.0;
            for (u32 j = 0; j < len; ++j) s += (double)D::load(base[(u64)j * inner]);
            out[r] = D::store((float)(op == GUST_MEAN ? s / (double)len : s));
        }
    }
}

template <typename D>
__device__ __forceinline__ void gust_argmax_rows(const typename D::S* __restrict__ x, u32* __restrict__ out, u32 outer,
                                                 u32 len, u32 inner) {
    const u32 outputs = outer * inner;
    for (u32 r = blockIdx.x; r < outputs; r += gridDim.x) {
        const u32 o = r / inner, i = r % inner;
        const typename D::S* base = x + (u64)o * len * inner + i;
        float best = gust_neg_inf();
        u32 best_i = 0xFFFFFFFFu;
        for (u32 j = threadIdx.x; j < len; j += blockDim.x) {
            const float v = D::load(base[(u64)j * inner]);
            if (gust_argmax_better(v, j, best, best_i)) {
                best = v;
                best_i = j;
            }
        }
        best_i = gust_block_argmax(best, best_i);
        if (threadIdx.x == 0) out[r] = best_i;
    }
}

template <typename D>
__device__ __forceinline__ void gust_argmax_cols(const typename D::S* __restrict__ x, u32* __restrict__ out, u32 outer,
                                                 u32 len, u32 inner) {
    GUST_GRID_STRIDE(r, outer * inner) {
        const u32 o = r / inner, i = r % inner;
        const typename D::S* base = x + (u64)o * len * inner + i;
        float best = gust_neg_inf();
        u32 best_i = 0xFFFFFFFFu;
        for (u32 j = 0; j < len; ++j) {
            const float v = D::load(base[(u64)j * inner]);
            if (gust_argmax_better(v, j, best, best_i)) {
                best = v;
                best_i = j;
            }
        }
        out[r] = best_i;
    }
}

// Softmax: subtract the maximum first (stable), sum the exponentials in f64,
// then scale by the f32 reciprocal, like the CPU backend.
template <typename D>
__device__ __forceinline__ void gust_softmax_rows(const typename D::S* __restrict__ x, typename D::S* __restrict__ out,
                                                  u32 outer, u32 len, u32 inner) {
    const u32 rows = outer * inner;
    for (u32 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u32 o = r / inner, i = r % inner;
        const u64 start = (u64)o * len * inner + i;
        float m = gust_neg_inf();
        for (u32 j = threadIdx.x; j < len; j += blockDim.x) m = gust_max_nan(m, D::load(x[start + (u64)j * inner]));
        m = gust_block_max(m);
        double s = 0.0;
        for (u32 j = threadIdx.x; j < len; j += blockDim.x) s += (double)expf(D::load(x[start + (u64)j * inner]) - m);
        s = gust_block_sum(s);
        const float inv = (float)(1.0 / s);
        for (u32 j = threadIdx.x; j < len; j += blockDim.x) {
            const u64 at = start + (u64)j * inner;
            out[at] = D::store(expf(D::load(x[at]) - m) * inv);
        }
    }
}

template <typename D>
__device__ __forceinline__ void gust_softmax_cols(const typename D::S* __restrict__ x, typename D::S* __restrict__ out,
                                                  u32 outer, u32 len, u32 inner) {
    GUST_GRID_STRIDE(r, outer * inner) {
        const u32 o = r / inner, i = r % inner;
        const u64 start = (u64)o * len * inner + i;
        float m = gust_neg_inf();
        for (u32 j = 0; j < len; ++j) m = gust_max_nan(m, D::load(x[start + (u64)j * inner]));
        double s = 0.0;
        for (u32 j = 0; j < len; ++j) s += (double)expf(D::load(x[start + (u64)j * inner]) - m);
        const float inv = (float)(1.0 / s);
        for (u32 j = 0; j < len; ++j) {
            const u64 at = start + (u64)j * inner;
            out[at] = D::store(expf(D::load(x[at]) - m) * inv);
        }
    }
}

#define GUST_REDUCE(SUFFIX, D)                                                                                        \
    extern "C" __global__ void reduce_rows_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 outer,    \
                                                    u32 len, u32 inner, int op) {                                     \
        gust_reduce_rows<D>(x, out, outer, len, inner, op);                                                            \
    }                                                                                                                  \
    extern "C" __global__ void reduce_cols_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 outer,    \
                                                    u32 len, u32 inner, int op) {                                     \
        gust_reduce_cols<D>(x, out, outer, len, inner, op);                                                            \
    }                                                                                                                  \
    extern "C" __global__ void argmax_rows_##SUFFIX(const D::S* __restrict__ x, u32* __restrict__ out, u32 outer,     \
                                                    u32 len, u32 inner) {                                             \
        gust_argmax_rows<D>(x, out, outer, len, inner);                                                                \
    }                                                                                                                  \
    extern "C" __global__ void argmax_cols_##SUFFIX(const D::S* __restrict__ x, u32* __restrict__ out, u32 outer,     \
                                                    u32 len, u32 inner) {                                             \
        gust_argmax_cols<D>(x, out, outer, len, inner);                                                                \
    }                                                                                                                  \
    extern "C" __global__ void softmax_rows_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 outer,   \
                                                     u32 len, u32 inner) {                                            \
        gust_softmax_rows<D>(x, out, outer, len, inner);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void softmax_cols_##SUFFIX(const D::S* __restrict__ x, D::S* __restrict__ out, u32 outer,   \
                                                     u32 len, u32 inner) {                                            \
        gust_softmax_cols<D>(x, out, outer, len, inner);                                                               \
    }

GUST_REDUCE(f32, GustF32)
GUST_REDUCE(f16, GustF16)
GUST_REDUCE(bf16, GustBF16)
