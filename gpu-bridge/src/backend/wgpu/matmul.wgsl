// Batched f32 matmul: 64x64 output tiles per 256-invocation workgroup, each
// invocation accumulating a 4x4 register block, with 16-deep slices of both
// operands staged in workgroup memory. Workgroups are numbered linearly over
// (batch, tile row, tile column) so the host can spread them over a 2-D grid.

struct Params {
    m: u32,
    k: u32,
    n: u32,
    batch: u32,
    tiles_m: u32,
    tiles_n: u32,
    // 1: batch entry b starts at base + b * stride (evenly spaced offsets,
    // the common case, with no table to read); 0: read per-entry offsets
    // from `offsets`.
    uniform_strides: u32,
    _pad0: u32,
    lhs_stride: u32,
    rhs_stride: u32,
    lhs_base: u32,
    rhs_base: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> lhs: array<f32>;
@group(0) @binding(3) var<storage, read> rhs: array<f32>;
// (lhs offset, rhs offset) per batch entry.
@group(0) @binding(4) var<storage, read> offsets: array<u32>;

const TS: u32 = 64u;
const BK: u32 = 16u;

// k-major so that the inner loop reads four consecutive rows / columns.
var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;

@compute @workgroup_size(16, 16, 1)
fn matmul(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let wid = wg.x + wg.y * nwg.x;
    let per_batch = p.tiles_m * p.tiles_n;
    if (wid >= per_batch * p.batch) {
        return;
    }
    let bi = wid / per_batch;
    let t = wid % per_batch;
    let row0 = (t / p.tiles_n) * TS;
    let col0 = (t % p.tiles_n) * TS;
    var lo = p.lhs_base + bi * p.lhs_stride;
    var ro = p.rhs_base + bi * p.rhs_stride;
    if (p.uniform_strides == 0u) {
        lo = offsets[2u * bi];
        ro = offsets[2u * bi + 1u];
    }
    let tr = lid.y * 4u;
    let tc = lid.x * 4u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.k; k0 = k0 + BK) {
        for (var e = 0u; e < 4u; e = e + 1u) {
            let flat = li + e * 256u;
            // Consecutive invocations read consecutive k of one lhs row.
            let r = flat / BK;
            let kk = flat % BK;
            let gr = row0 + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gr < p.m && gk < p.k) {
                v = lhs[lo + gr * p.k + gk];
            }
            a_tile[kk * TS + r] = v;
        }
        for (var e = 0u; e < 4u; e = e + 1u) {
            let flat = li + e * 256u;
            let kk = flat / TS;
            let c = flat % TS;
            let gk = k0 + kk;
            let gc = col0 + c;
            var v = 0.0;
            if (gk < p.k && gc < p.n) {
                v = rhs[ro + gk * p.n + gc];
            }
            b_tile[kk * TS + c] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let ab = kk * TS + tr;
            let bb = kk * TS + tc;
            let av = vec4<f32>(a_tile[ab], a_tile[ab + 1u], a_tile[ab + 2u], a_tile[ab + 3u]);
            let bv = vec4<f32>(b_tile[bb], b_tile[bb + 1u], b_tile[bb + 2u], b_tile[bb + 3u]);
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }

    let ob = bi * p.m * p.n;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gr = row0 + tr + i;
        if (gr >= p.m) {
            break;
        }
        var v = acc0;
        if (i == 1u) {
            v = acc1;
        } else if (i == 2u) {
            v = acc2;
        } else if (i == 3u) {
            v = acc3;
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let gc = col0 + tc + j;
            if (gc < p.n) {
                out[ob + gr * p.n + gc] = v[j];
            }
        }
    }
}
