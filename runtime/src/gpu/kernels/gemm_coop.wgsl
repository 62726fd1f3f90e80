// Tiled linear layer on tensor cores (cooperative matrices, Features::EXPERIMENTAL_COOPERATIVE_MATRIX): the same
// contract, grid and split-K as gemm.wgsl, with f16 inputs and f32 accumulation. Used for f16 and packed weights
// (x and the weights are rounded to f16 on the way into workgroup memory), never for f32 weights.
//
// The module starts with `enable wgpu_cooperative_matrix;` (and `enable f16;`), then the usual parts; the
// tile-constant part sets SG (the device's one subgroup size), the subgroup grid SG_M x SG_N and each subgroup's
// FM x FN fragments of 16 x 16, BK (the k step, a multiple of 16) and ALIGNED. The workgroup (SG_M * SG_N
// subgroups) owns a BM x BN output tile; subgroup (sm, sn) owns FM x FN accumulators of 16 x 16 f32.
//
// Each k step stages BM x BK of x and BN x BK of the weights as f16 in workgroup memory, row-major along k with
// rows padded by 8 halves (16 bytes: aligned fragment loads, rows spread over banks): x as matrix A read with
// coopLoadT, the weight rows as the columns of matrix B (B[kk][c] = w[c][kk]) read with coopLoad. Global loads are
// 4 elements at a time, consecutive threads along k (coalesced); the tiles are double-buffered as in gemm.wgsl (next
// step's loads in flight while this step multiplies, one barrier per step). The epilogue stores one fragment per
// subgroup at a time to workgroup memory and applies bias, activation, placement and residual per element.
// Pointer indices are `let`s first (naga's SPIR-V writer needs it for coopLoad / coopStore).

const BM: u32 = SG_M * FM * 16u;
const BN: u32 = SG_N * FN * 16u;
const WG: u32 = SG * SG_M * SG_N;
const LDS: u32 = BK + 8u;
const A_LOADS: u32 = BM * BK / 4u / WG;
const B_LOADS: u32 = BN * BK / 4u / WG;

var<workgroup> a_tile: array<f16, 2u * BM * LDS>;
var<workgroup> b_tile: array<f16, 2u * BN * LDS>;
// One 16 x 16 f32 fragment per subgroup: accumulators on their way to the epilogue (and zeros to start them).
var<workgroup> c_frag: array<f32, SG_M * SG_N * 256u>;

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
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) sg_lane: u32) {
    let tiles_n = (params.n + BN - 1u) / BN;
    let tiles_m = (params.m + BM - 1u) / BM;
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= tiles_n * tiles_m) {
        return;
    }
    let row0 = (tile / tiles_n) * BM;
    let col0 = (tile % tiles_n) * BN;
    let split = wid.z;
    let k_begin = split * params.k_split;
    let k_end = min(params.k, k_begin + params.k_split);
    let steps = (k_end - k_begin + BK - 1u) / BK;
    let sm = sg / SG_N;
    let sn = sg % SG_N;

    // Zero accumulators, loaded from a zeroed fragment.
    for (var e = sg_lane; e < 256u; e += SG) {
        c_frag[sg * 256u + e] = 0.0;
    }
    workgroupBarrier();
    let zero_off = sg * 256u;
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&c_frag[zero_off], 16u);
    var acc: array<coop_mat16x16<f32, C>, FM * FN>;
    for (var f = 0u; f < FM * FN; f++) {
        acc[f] = zero;
    }

    var a_next: array<vec4<f32>, A_LOADS>;
    var b_next: array<vec4<f32>, B_LOADS>;
    // Piece e of a tile: tile row e / (BK / 4), k offset 4 * (e % (BK / 4)) (consecutive threads along k).
    for (var i = 0u; i < A_LOADS; i++) {
        let e = lid + i * WG;
        a_next[i] = load4(false, row0 + e / (BK / 4u), params.m, k_begin + 4u * (e % (BK / 4u)), k_end);
    }
    for (var i = 0u; i < B_LOADS; i++) {
        let e = lid + i * WG;
        b_next[i] = load4(true, col0 + e / (BK / 4u), params.n, k_begin + 4u * (e % (BK / 4u)), k_end);
    }
    for (var step = 0u; step < steps; step++) {
        let buf = step % 2u;
        for (var i = 0u; i < A_LOADS; i++) {
            let e = lid + i * WG;
            let at = (buf * BM + e / (BK / 4u)) * LDS + 4u * (e % (BK / 4u));
            let h = vec4<f16>(a_next[i]);
            a_tile[at] = h.x;
            a_tile[at + 1u] = h.y;
            a_tile[at + 2u] = h.z;
            a_tile[at + 3u] = h.w;
        }
        for (var i = 0u; i < B_LOADS; i++) {
            let e = lid + i * WG;
            let at = (buf * BN + e / (BK / 4u)) * LDS + 4u * (e % (BK / 4u));
            let h = vec4<f16>(b_next[i]);
            b_tile[at] = h.x;
            b_tile[at + 1u] = h.y;
            b_tile[at + 2u] = h.z;
            b_tile[at + 3u] = h.w;
        }
        workgroupBarrier();
        if (step + 1u < steps) {
            let k_next = k_begin + (step + 1u) * BK;
            for (var i = 0u; i < A_LOADS; i++) {
                let e = lid + i * WG;
                a_next[i] = load4(false, row0 + e / (BK / 4u), params.m, k_next + 4u * (e % (BK / 4u)), k_end);
            }
            for (var i = 0u; i < B_LOADS; i++) {
                let e = lid + i * WG;
                b_next[i] = load4(true, col0 + e / (BK / 4u), params.n, k_next + 4u * (e % (BK / 4u)), k_end);
            }
        }
        for (var kk = 0u; kk < BK; kk += 16u) {
            var a: array<coop_mat16x16<f16, A>, FM>;
            for (var fm = 0u; fm < FM; fm++) {
                let a_off = (buf * BM + (sm * FM + fm) * 16u) * LDS + kk;
                a[fm] = coopLoadT<coop_mat16x16<f16, A>>(&a_tile[a_off], LDS);
            }
            for (var fn_ = 0u; fn_ < FN; fn_++) {
                let b_off = (buf * BN + (sn * FN + fn_) * 16u) * LDS + kk;
                let b = coopLoad<coop_mat16x16<f16, B>>(&b_tile[b_off], LDS);
                for (var fm = 0u; fm < FM; fm++) {
                    acc[fm * FN + fn_] = coopMultiplyAdd(a[fm], b, acc[fm * FN + fn_]);
                }
            }
        }
    }
    // Epilogue, one fragment of each subgroup at a time through c_frag.
    for (var f = 0u; f < FM * FN; f++) {
        workgroupBarrier();
        let c_off = sg * 256u;
        coopStoreT(acc[f], &c_frag[c_off], 16u);
        workgroupBarrier();
        let r0 = row0 + (sm * FM + f / FN) * 16u;
        let c0 = col0 + (sn * FN + f % FN) * 16u;
        for (var e = sg_lane; e < 256u; e += SG) {
            let r = r0 + e / 16u;
            let c = c0 + e % 16u;
            if (r < params.m && c < params.n) {
                let v = c_frag[sg * 256u + e];
                if (params.splits > 1u) {
                    store_partial(split, r, c, v);
                } else {
                    store_output(r, c, v);
                }
            }
        }
    }
}
