// out = act(x @ w^T + bias) (+ out): a 64x64 output tile per workgroup, 4x4 outputs per thread, k in steps of 16
// through workgroup memory. For prefill and large batches; edges of non-multiple shapes are zero-filled.

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> xs: array<array<f32, 64>, 16>;
var<workgroup> ws: array<array<f32, 64>, 16>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    // Tiles are numbered row-major over the output; the grid is folded into x and y to respect dispatch limits.
    let tile = wid.x + wid.y * nwg.x;
    let tiles_n = (params.n + BN - 1u) / BN;
    let tiles_m = (params.m + BM - 1u) / BM;
    if (tile >= tiles_n * tiles_m) {
        return;
    }
    let row0 = (tile / tiles_n) * BM;
    let col0 = (tile % tiles_n) * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }
    let k = params.k;
    for (var k0 = 0u; k0 < k; k0 += BK) {
        // Each thread stages 4 elements of the x tile and 4 of the weight tile.
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + 256u * e;
            let r = idx / BK;
            let kk = idx % BK;
            let gk = k0 + kk;
            let gr = row0 + r;
            var xv = 0.0;
            if (gr < params.m && gk < k) {
                xv = x[gr * k + gk];
            }
            xs[kk][r] = xv;
            let gc = col0 + r;
            var wv = 0.0;
            if (gc < params.n && gk < k) {
                wv = load_w(gc * k + gk);
            }
            ws[kk][r] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[kk][ty + 16u * i];
                b[i] = ws[kk][tx + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + tx + 16u * j;
            if (r < params.m && c < params.n) {
                store_output(r, c, acc[i][j]);
            }
        }
    }
}
