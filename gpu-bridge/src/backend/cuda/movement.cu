// Data movement: Permute, Slice / Concat (one strided row copy), Gather.
// Prepended with common.cuh. These move raw elements whatever their dtype,
// so each exists for 2-byte (u16) and 4-byte (u32) elements.

// Permute layout after the host merged dimensions that stay adjacent:
// output `shape` and, per output dimension, the input element stride.
struct GustPermuteLayout {
    u32 rank;
    u32 shape[GUST_MAX_RANK];
    u32 in_stride[GUST_MAX_RANK];
};

template <typename T>
__device__ __forceinline__ void gust_permute(const T* __restrict__ x, T* __restrict__ out, u32 n,
                                             GustPermuteLayout layout) {
    GUST_GRID_STRIDE(i, n) {
        u32 rem = i;
        u64 src = 0;
        // Unrolled with constant indices so the layout stays in parameter
        // space instead of being copied to local memory per thread.
#pragma unroll
        for (int d = GUST_MAX_RANK - 1; d >= 0; --d) {
            if ((u32)d < layout.rank) {
                const u32 extent = layout.shape[d];
                src += (u64)(rem % extent) * layout.in_stride[d];
                rem /= extent;
            }
        }
        out[i] = x[src];
    }
}

// dst[o * dst_stride + dst_offset + c] = src[o * src_stride + src_offset + c]
// for o < rows, c < chunk. Slice reads a window of each input row; Concat
// writes each input into a window of each output row.
template <typename T>
__device__ __forceinline__ void gust_copy_rows(const T* __restrict__ src, T* __restrict__ dst, u32 rows, u32 chunk,
                                               u64 src_stride, u64 src_offset, u64 dst_stride, u64 dst_offset) {
    GUST_GRID_STRIDE(t, rows * chunk) {
        const u32 o = t / chunk, c = t % chunk;
        dst[(u64)o * dst_stride + dst_offset + c] = src[(u64)o * src_stride + src_offset + c];
    }
}

// out[r, c] = table[indices[r], c], or 0 when the index is out of range.
// Indices are read as u32 for both I32 and U32: a negative i32 reinterpreted
// is >= 2^31 > rows (tensors hold fewer than 2^31 elements), so one unsigned
// comparison rejects negative and too-large indices alike.
template <typename T>
__device__ __forceinline__ void gust_gather(const T* __restrict__ table, const u32* __restrict__ indices,
                                            T* __restrict__ out, u32 count, u32 rows, u32 row_len) {
    GUST_GRID_STRIDE(t, count * row_len) {
        const u32 r = t / row_len, c = t % row_len;
        const u32 index = indices[r];
        out[t] = index < rows ? table[(u64)index * row_len + c] : (T)0;
    }
}

#define GUST_MOVEMENT(SUFFIX, T)                                                                                      \
    extern "C" __global__ void permute_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, u32 n,                  \
                                                GustPermuteLayout layout) {                                           \
        gust_permute<T>(x, out, n, layout);                                                                            \
    }                                                                                                                  \
    extern "C" __global__ void copy_rows_##SUFFIX(const T* __restrict__ src, T* __restrict__ dst, u32 rows, u32 chunk, \
                                                  u64 src_stride, u64 src_offset, u64 dst_stride, u64 dst_offset) {   \
        gust_copy_rows<T>(src, dst, rows, chunk, src_stride, src_offset, dst_stride, dst_offset);                      \
    }                                                                                                                  \
    extern "C" __global__ void gather_##SUFFIX(const T* __restrict__ table, const u32* __restrict__ indices,          \
                                               T* __restrict__ out, u32 count, u32 rows, u32 row_len) {               \
        gust_gather<T>(table, indices, out, count, rows, row_len);                                                     \
    }

GUST_MOVEMENT(u16, u16)
GUST_MOVEMENT(u32, u32)
