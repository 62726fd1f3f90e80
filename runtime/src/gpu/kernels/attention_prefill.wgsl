// Causal attention with a padding mask over a KV cache, flash-style (prefill: many queries per sequence). One
// workgroup per (sequence, head, block of BQ queries): the block's queries are staged once in workgroup memory, then
// the keys 0 .. (last query's position) pass through in tiles of BK, each tile read from the cache once per block
// (keys first, then values into the same memory). Every query keeps an online softmax (running max and sum), so any
// length runs in fixed memory. Tiles past the block's last query (above the causal diagonal) are never read.
// A query with no visible key yields zeros, never NaN: masked keys score NEG and weigh exactly 0, and their value
// rows are staged as zeros (a padded cache row may hold anything).
//
// One tile, two thread layouts (all sizes are pipeline constants, chosen by the host per head size):
//   scores: WG / TK_S queries x TK_S keys, RQ x RK scores per thread, q . k from staged vec4 rows;
//   output: WG / T_D queries x T_D vec4 columns, RQO rows x RD vec4 columns of the output per thread.
// Both layouts track each of their rows' running max from the same per-tile partial maxima, so they agree exactly.
// Staged rows are STRIDE vec4 apart, an odd number, so the eight rows a quarter-warp reads at one column fall in
// eight distinct 16-byte bank groups.
// Dispatch: batch * n_head * blocks workgroups, folded over x and y.

override WG: u32 = 128u;
override BQ: u32 = 16u;
override BK: u32 = 32u;
// vec4 columns of the widest head these constants serve; the actual head_dim comes with the parameters.
override D4_MAX: u32 = 32u;
override TK_S: u32 = 8u;
override T_D: u32 = 32u;

override STRIDE: u32 = D4_MAX | 1u;
override TQ_S: u32 = WG / TK_S;
override RQ: u32 = BQ / TQ_S;
override RK: u32 = BK / TK_S;
override TQ_O: u32 = WG / T_D;
override RQO: u32 = BQ / TQ_O;
override RD: u32 = (D4_MAX + T_D - 1u) / T_D;
override P_STRIDE: u32 = BK + 1u;

var<workgroup> qs: array<vec4<f32>, BQ * STRIDE>;
// The tile's keys, then its values.
var<workgroup> kv: array<vec4<f32>, BK * STRIDE>;
var<workgroup> probs: array<f32, BQ * P_STRIDE>;
// Per query row, per score thread: the tile's partial max and partial sum of weights.
var<workgroup> red_max: array<f32, BQ * TK_S>;
var<workgroup> red_sum: array<f32, BQ * TK_S>;
// Whether each key of the tile is a real token in range (1) or padding / past the block's last query (0).
var<workgroup> key_ok: array<u32, BK>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let item = wid.x + wid.y * nwg.x;
    if (item >= params.batch * params.n_head * params.blocks) {
        return;
    }
    // A (sequence, head)'s blocks in decreasing order: the blocks with the most keys start first.
    let blk = params.blocks - 1u - item % params.blocks;
    let pair = item / params.blocks;
    let head = pair % params.n_head;
    let b = pair / params.n_head;
    let i0 = blk * BQ;
    let n_q = min(BQ, params.s_new - i0);
    let d_len = params.head_dim;
    let d4 = (d_len + 3u) / 4u;
    let seq = b * params.capacity;
    let col0 = head * d_len;
    let row0 = b * params.s_new + i0;
    let pos0 = params.past + i0;
    // Keys 0 .. end are visible to some query of the block.
    let end = pos0 + n_q;

    for (var e = lid; e < BQ * d4; e += WG) {
        let r = e / d4;
        let c = e % d4;
        var v = vec4<f32>(0.0);
        if (r < n_q) {
            v = load_q4((row0 + r) * params.hidden + col0 + 4u * c, d_len - 4u * c);
        }
        qs[r * STRIDE + c] = v;
    }

    let tk = lid % TK_S;
    let tq = lid / TK_S;
    let td = lid % T_D;
    let tqo = lid / T_D;
    // Registers, sized for the largest tiles the host uses (RQ <= 2, RQ * RK <= 8, RQO <= 4, RQO * RD <= 4):
    // bigger arrays cost lavapipe's compiler time for nothing.
    var sc: array<f32, 8>;
    var qv: array<vec4<f32>, 2>;
    var m_s: array<f32, 2>;
    var m_o: array<f32, 4>;
    var l_o: array<f32, 4>;
    var pr: array<f32, 4>;
    var acc: array<vec4<f32>, 4>;
    for (var u = 0u; u < RQ; u++) {
        m_s[u] = NEG;
    }
    for (var u = 0u; u < RQO; u++) {
        m_o[u] = NEG;
        l_o[u] = 0.0;
    }
    for (var i = 0u; i < RQO * RD; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var j0 = 0u; j0 < end; j0 += BK) {
        let n_k = min(BK, end - j0);
        // Score threads with a key in the tile (the others' partial max and sum are NEG and 0): a runtime bound
        // skips them, and a fully unrolled pipeline-constant loop here would cost lavapipe's compiler far more.
        let tk_used = min(TK_S, n_k);
        if (lid < BK) {
            key_ok[lid] = select(0u, 1u, lid < n_k && mask[seq + j0 + lid] != 0u);
        }
        for (var e = lid; e < BK * d4; e += WG) {
            let jj = e / d4;
            let c = e % d4;
            var v = vec4<f32>(0.0);
            if (jj < n_k) {
                v = load_k4((seq + j0 + jj) * params.hidden + col0 + 4u * c, d_len - 4u * c);
            }
            kv[jj * STRIDE + c] = v;
        }
        workgroupBarrier();

        // Scores of rows tq + TQ_S * u against keys tk + TK_S * w.
        for (var i = 0u; i < RQ * RK; i++) {
            sc[i] = 0.0;
        }
        for (var c = 0u; c < d4; c++) {
            for (var u = 0u; u < RQ; u++) {
                qv[u] = qs[(tq + TQ_S * u) * STRIDE + c];
            }
            for (var w = 0u; w < RK; w++) {
                let kc4 = kv[(tk + TK_S * w) * STRIDE + c];
                for (var u = 0u; u < RQ; u++) {
                    sc[u * RK + w] += dot(qv[u], kc4);
                }
            }
        }
        for (var u = 0u; u < RQ; u++) {
            let r = tq + TQ_S * u;
            var mx = NEG;
            for (var w = 0u; w < RK; w++) {
                let jj = tk + TK_S * w;
                let visible = key_ok[jj] != 0u && j0 + jj <= pos0 + r;
                let s = select(NEG, sc[u * RK + w] * params.scale, visible);
                sc[u * RK + w] = s;
                mx = max(mx, s);
            }
            red_max[r * TK_S + tk] = mx;
        }
        workgroupBarrier();

        // Weights against the new running max; every key read of the tile is done, so values replace keys.
        for (var u = 0u; u < RQ; u++) {
            let r = tq + TQ_S * u;
            var mt = NEG;
            for (var t = 0u; t < tk_used; t++) {
                mt = max(mt, red_max[r * TK_S + t]);
            }
            let m_new = max(m_s[u], mt);
            var sum = 0.0;
            for (var w = 0u; w < RK; w++) {
                let s = sc[u * RK + w];
                let p = select(0.0, exp(s - m_new), s > REAL);
                probs[r * P_STRIDE + tk + TK_S * w] = p;
                sum += p;
            }
            red_sum[r * TK_S + tk] = sum;
            m_s[u] = m_new;
        }
        for (var e = lid; e < BK * d4; e += WG) {
            let jj = e / d4;
            let c = e % d4;
            var v = vec4<f32>(0.0);
            if (key_ok[jj] != 0u) {
                v = load_v4((seq + j0 + jj) * params.hidden + col0 + 4u * c, d_len - 4u * c);
            }
            kv[jj * STRIDE + c] = v;
        }
        workgroupBarrier();

        // Output rows tqo + TQ_O * u, vec4 columns td + T_D * w: rescale, then add this tile's weighted values.
        for (var u = 0u; u < RQO; u++) {
            let r = tqo + TQ_O * u;
            var mt = NEG;
            var sum = 0.0;
            for (var t = 0u; t < tk_used; t++) {
                mt = max(mt, red_max[r * TK_S + t]);
                sum += red_sum[r * TK_S + t];
            }
            let m_new = max(m_o[u], mt);
            let corr = exp(m_o[u] - m_new);
            l_o[u] = l_o[u] * corr + sum;
            m_o[u] = m_new;
            for (var w = 0u; w < RD; w++) {
                acc[u * RD + w] *= corr;
            }
        }
        for (var jj = 0u; jj < n_k; jj++) {
            for (var u = 0u; u < RQO; u++) {
                pr[u] = probs[(tqo + TQ_O * u) * P_STRIDE + jj];
            }
            for (var w = 0u; w < RD; w++) {
                let c = td + T_D * w;
                if (c < d4) {
                    let v = kv[jj * STRIDE + c];
                    for (var u = 0u; u < RQO; u++) {
                        acc[u * RD + w] = fma(vec4<f32>(pr[u]), v, acc[u * RD + w]);
                    }
                }
            }
        }
        workgroupBarrier();
    }

    for (var u = 0u; u < RQO; u++) {
        let r = tqo + TQ_O * u;
        if (r < n_q) {
            let inv = select(0.0, 1.0 / l_o[u], l_o[u] > 0.0);
            for (var w = 0u; w < RD; w++) {
                let c = td + T_D * w;
                if (c < d4) {
                    store_out4((row0 + r) * params.hidden + col0 + 4u * c, d_len - 4u * c, acc[u * RD + w] * inv);
                }
            }
        }
    }
}
