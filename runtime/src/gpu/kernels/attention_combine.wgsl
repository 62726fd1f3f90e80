// Merges attention_decode.wgsl's splits: for each (query row, head) pair and element e of its head,
// out = sum_s exp(m_s - M) o_s[e] / sum_s exp(m_s - M) l_s with M = max_s m_s (zeros when every split saw no key).
// One thread per output element; out[pair * head_dim + e] is the [rows, hidden] layout (hidden = n_head * head_dim).

struct Params {
    pairs: u32,
    head_dim: u32,
    splits: u32,
    // The f32 index in `partials` where the (max, sum) pairs start.
    stats_off: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<act>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let idx = (wid.x + wid.y * nwg.x) * 128u + lid;
    if (idx >= params.pairs * params.head_dim) {
        return;
    }
    let pair = idx / params.head_dim;
    let e = idx % params.head_dim;
    let first = pair * params.splits;
    var m = -1.0e30;
    for (var s = 0u; s < params.splits; s++) {
        m = max(m, partials[params.stats_off + 2u * (first + s)]);
    }
    var l = 0.0;
    var o = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        let at = params.stats_off + 2u * (first + s);
        let w = exp(partials[at] - m);
        l = fma(partials[at + 1u], w, l);
        o = fma(partials[(first + s) * params.head_dim + e], w, o);
    }
    out[idx] = act(select(0.0, o / l, l > 0.0));
}
