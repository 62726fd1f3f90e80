// out = act(x @ w^T + bias) (+ out) for at most 8 rows of x (decode): each workgroup computes 4 output columns, 64
// threads per column striding over k, so every weight element is read once for all rows; then a tree reduction in
// workgroup memory.

const MAX_M: u32 = 8u;
// Rows of x, fixed per pipeline (1..=8) so every loop over rows unrolls and the accumulators stay in registers.
override M: u32 = 1u;

var<workgroup> partial: array<f32, 2048>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let lane = lid % 64u;
    let slot = lid / 64u;
    let c = (wid.x + wid.y * nwg.x) * 4u + slot;
    let k = params.k;
    let m = M;
    var acc: array<f32, 8>;
    for (var r = 0u; r < M; r++) {
        acc[r] = 0.0;
    }
    if (c < params.n) {
        let base = c * k;
        if (k % 2u == 0u) {
            // Pairs: one u32 load per two f16 weights.
            let half_k = k / 2u;
            for (var p = lane; p < half_k; p += 64u) {
                let wv = load_w2(base / 2u + p);
                for (var r = 0u; r < m; r++) {
                    let xi = r * k + 2u * p;
                    acc[r] = fma(wv.x, x[xi], fma(wv.y, x[xi + 1u], acc[r]));
                }
            }
        } else {
            for (var kk = lane; kk < k; kk += 64u) {
                let wv = load_w(base + kk);
                for (var r = 0u; r < m; r++) {
                    acc[r] = fma(wv, x[r * k + kk], acc[r]);
                }
            }
        }
    }
    for (var r = 0u; r < M; r++) {
        partial[r * 256u + lid] = acc[r];
    }
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            for (var r = 0u; r < M; r++) {
                partial[r * 256u + lid] += partial[r * 256u + lid + stride];
            }
        }
        workgroupBarrier();
    }
    if (c < params.n && lane < m) {
        store_output(lane, c, partial[lane * 256u + slot * 64u]);
    }
}
