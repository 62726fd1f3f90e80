// Tiled linear layer, portable (every device): out = act(x @ w^T + bias) (+ out) for prefill, and for decode batches
// of 9 to 64 rows with one row tile covering every row (so each weight byte is read once per dispatch) and the k
// range split over grid z (split-K) when the column tiles alone would not fill the GPU.
//
// The tile-constant part sets BM x BN (the workgroup's output tile), BK (the k step), TM x TN (outputs per thread,
// multiples of 4) and ALIGNED (k a multiple of 4). Each k step stages an x tile and a weight tile in workgroup
// memory, k-major and as vec4s: a thread's TM rows and TN columns are TM / 4 and TN / 4 vec4s spaced 4 * TY and
// 4 * TX apart, so neighbouring threads read neighbouring vec4s (no bank conflicts) and each k step is TM * TN
// fused multiply-adds per TM / 4 + TN / 4 loads. Each tile row is padded by one vec4, so the transposing stores
// (consecutive threads, consecutive rows of the tile) hit consecutive banks too. The tiles are double-buffered:
// the next tile's global loads are issued into registers before the current tile is used, and one barrier per k
// step separates the two buffers. Global loads are 4 elements at a time (one load when ALIGNED); edges of tiles,
// k ranges and shapes are zero-filled. f32 accumulation.
//
// Grid: x and y fold the tile index (row tiles times column tiles, column tiles fastest); z is the k range. With
// params.splits > 1 each k range writes partial sums for splitk_reduce.wgsl instead of the output.

const TX: u32 = BN / TN;
const TY: u32 = BM / TM;
const WG: u32 = TX * TY;
// vec4s per tile row (k-major: one row per k), one vec4 of padding.
const AS_ROW: u32 = BM / 4u + 1u;
const BS_ROW: u32 = BN / 4u + 1u;
// Four-element pieces each thread loads per tile.
const A_LOADS: u32 = BM * BK / 4u / WG;
const B_LOADS: u32 = BN * BK / 4u / WG;

var<workgroup> a_tile: array<vec4<f32>, 2u * BK * AS_ROW>;
var<workgroup> b_tile: array<vec4<f32>, 2u * BK * BS_ROW>;

// Four consecutive k values of x row `r` (or of weight row `r` when `weights`) starting at `kk`, zero past the
// tile's rows or the k range's end.
fn load4(weights: bool, r: u32, rows: u32, kk: u32, k_end: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (r >= rows) {
        return v;
    }
    if (ALIGNED) {
        if (kk < k_end) {
            if (weights) {
                v = w4_at(r, kk);
            } else {
                v = x4_at(r * params.k + kk);
            }
        }
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (kk + j < k_end) {
                if (weights) {
                    v[j] = w_at(r, kk + j);
                } else {
                    v[j] = x_at(r * params.k + kk + j);
                }
            }
        }
    }
    return v;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tiles_n = (params.n + BN - 1u) / BN;
    let tiles_m = (params.m + BM - 1u) / BM;
    let tile = wid.x + wid.y * nwg.x;
    // Uniform per workgroup: the whole workgroup leaves together, before any barrier.
    if (tile >= tiles_n * tiles_m) {
        return;
    }
    let row0 = (tile / tiles_n) * BM;
    let col0 = (tile % tiles_n) * BN;
    let split = wid.z;
    let k_begin = split * params.k_split;
    let k_end = min(params.k, k_begin + params.k_split);
    let steps = (k_end - k_begin + BK - 1u) / BK;
    let tx = lid % TX;
    let ty = lid / TX;

    var acc: array<vec4<f32>, TM * TN / 4u>;
    var a_next: array<vec4<f32>, A_LOADS>;
    var b_next: array<vec4<f32>, B_LOADS>;

    // Piece e of a tile: tile row e % BM (consecutive threads, consecutive rows), k offset 4 * (e / BM).
    for (var i = 0u; i < A_LOADS; i++) {
        let e = lid + i * WG;
        a_next[i] = load4(false, row0 + e % BM, params.m, k_begin + 4u * (e / BM), k_end);
    }
    for (var i = 0u; i < B_LOADS; i++) {
        let e = lid + i * WG;
        b_next[i] = load4(true, col0 + e % BN, params.n, k_begin + 4u * (e / BN), k_end);
    }
    for (var step = 0u; step < steps; step++) {
        let buf = step % 2u;
        // Store the loaded tile, transposed to k-major.
        for (var i = 0u; i < A_LOADS; i++) {
            let e = lid + i * WG;
            let r = e % BM;
            let kq = e / BM;
            for (var j = 0u; j < 4u; j++) {
                a_tile[(buf * BK + 4u * kq + j) * AS_ROW + r / 4u][r % 4u] = a_next[i][j];
            }
        }
        for (var i = 0u; i < B_LOADS; i++) {
            let e = lid + i * WG;
            let c = e % BN;
            let kq = e / BN;
            for (var j = 0u; j < 4u; j++) {
                b_tile[(buf * BK + 4u * kq + j) * BS_ROW + c / 4u][c % 4u] = b_next[i][j];
            }
        }
        workgroupBarrier();
        // Issue the next step's loads before using this one.
        if (step + 1u < steps) {
            let k_next = k_begin + (step + 1u) * BK;
            for (var i = 0u; i < A_LOADS; i++) {
                let e = lid + i * WG;
                a_next[i] = load4(false, row0 + e % BM, params.m, k_next + 4u * (e / BM), k_end);
            }
            for (var i = 0u; i < B_LOADS; i++) {
                let e = lid + i * WG;
                b_next[i] = load4(true, col0 + e % BN, params.n, k_next + 4u * (e / BN), k_end);
            }
        }
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<vec4<f32>, TM / 4u>;
            var b: array<vec4<f32>, TN / 4u>;
            for (var g = 0u; g < TM / 4u; g++) {
                a[g] = a_tile[(buf * BK + kk) * AS_ROW + g * TY + ty];
            }
            for (var g = 0u; g < TN / 4u; g++) {
                b[g] = b_tile[(buf * BK + kk) * BS_ROW + g * TX + tx];
            }
            for (var i = 0u; i < TM; i++) {
                let av = vec4<f32>(a[i / 4u][i % 4u]);
                for (var g = 0u; g < TN / 4u; g++) {
                    acc[i * (TN / 4u) + g] = fma(av, b[g], acc[i * (TN / 4u) + g]);
                }
            }
        }
        // The other buffer is written next step while slower threads may still read this one: one barrier per
        // step suffices because consecutive steps use different buffers.
    }
    for (var i = 0u; i < TM; i++) {
        let r = row0 + (i / 4u) * 4u * TY + ty * 4u + i % 4u;
        if (r >= params.m) {
            continue;
        }
        for (var g = 0u; g < TN / 4u; g++) {
            for (var j = 0u; j < 4u; j++) {
                let c = col0 + g * 4u * TX + tx * 4u + j;
                if (c < params.n) {
                    if (params.splits > 1u) {
                        store_partial(split, r, c, acc[i * (TN / 4u) + g][j]);
                    } else {
                        store_output(r, c, acc[i * (TN / 4u) + g][j]);
                    }
                }
            }
        }
    }
}
