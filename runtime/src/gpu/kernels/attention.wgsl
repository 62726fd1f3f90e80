// Causal self-attention with a padding mask over a KV cache, for prefill (s_new = prompt length, past = 0) and decode
// (s_new = 1). One workgroup per (query row, head); keys in blocks of 64 with an online softmax, so any sequence
// length works in fixed workgroup memory. A query with no visible key (a padded row) yields zeros, never NaN.

struct Params {
    // Queries per sequence in this step, and tokens already in the cache before it.
    s_new: u32,
    past: u32,
    // Cache rows per sequence: k and v are [batch, capacity, hidden]; mask is [batch, capacity] (1 = real token).
    capacity: u32,
    hidden: u32,
    n_head: u32,
    head_dim: u32,
    // head_dim^-0.5, applied to q . k (the same as scaling q after its bias).
    scale: f32,
    n_rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
// Bindings 2 and 3, the keys and values, come with load_k / load_v from cache_f32.wgsl or cache_f16.wgsl.
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// WG, PER_THREAD, NEG, qs, probs and reduce_f come from attention_common.wgsl.

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let item = wid.x + wid.y * nwg.x;
    if (item >= params.n_rows * params.n_head) {
        return;
    }
    let row = item / params.n_head;
    let head = item % params.n_head;
    let b = row / params.s_new;
    let i = row % params.s_new;
    // Keys 0 ..= pos are visible (causal), if the mask says they are real tokens.
    let pos = params.past + i;
    let d_len = params.head_dim;
    let q_base = row * params.hidden + head * d_len;
    for (var d = lid; d < d_len; d += WG) {
        qs[d] = q[q_base + d];
    }
    workgroupBarrier();

    var m_run = NEG;
    var l_run = 0.0;
    var acc: array<f32, 4>;
    for (var c = 0u; c < PER_THREAD; c++) {
        acc[c] = 0.0;
    }
    let seq_base = b * params.capacity;
    for (var j0 = 0u; j0 <= pos; j0 += WG) {
        let j = j0 + lid;
        var valid = false;
        var s = NEG;
        if (j <= pos) {
            valid = mask[seq_base + j] != 0u;
        }
        if (valid) {
            let k_base = (seq_base + j) * params.hidden + head * d_len;
            var dot = 0.0;
            for (var d = 0u; d < d_len; d++) {
                dot = fma(qs[d], load_k(k_base + d), dot);
            }
            s = dot * params.scale;
        }
        let m_new = max(m_run, reduce_f(lid, s, true));
        var p = 0.0;
        if (valid) {
            p = exp(s - m_new);
        }
        probs[lid] = p;
        let block_sum = reduce_f(lid, p, false);
        let correction = exp(m_run - m_new);
        l_run = l_run * correction + block_sum;
        let n_keys = min(WG, pos + 1u - j0);
        for (var c = 0u; c < PER_THREAD; c++) {
            let d = lid + c * WG;
            if (d < d_len) {
                var a = acc[c] * correction;
                for (var jj = 0u; jj < n_keys; jj++) {
                    let pj = probs[jj];
                    if (pj != 0.0) {
                        a = fma(pj, load_v((seq_base + j0 + jj) * params.hidden + head * d_len + d), a);
                    }
                }
                acc[c] = a;
            }
        }
        m_run = m_new;
        workgroupBarrier();
    }
    let inv = select(0.0, 1.0 / l_run, l_run > 0.0);
    for (var c = 0u; c < PER_THREAD; c++) {
        let d = lid + c * WG;
        if (d < d_len) {
            out[q_base + d] = acc[c] * inv;
        }
    }
}
