// Shared by the dense and sparse attention kernels (attention_prefill, attention_decode, sparse_attention): the
// parameters, the query and output bindings (activations, `act` from act_f32/act_f16.wgsl, which comes first in the
// module) and the mask. Arithmetic is f32 whatever the storage.

struct Params {
    // Queries per sequence in this step (rows b * s_new .. of q and out), and tokens already cached before them:
    // query i of a sequence sits at position past + i and sees keys 0 ..= past + i that the mask marks real.
    s_new: u32,
    past: u32,
    // Cache rows per sequence: k and v are [batch, capacity, hidden]; mask is [batch, capacity] (1 = real token).
    capacity: u32,
    hidden: u32,
    n_head: u32,
    head_dim: u32,
    // head_dim^-0.5, applied to q . k.
    scale: f32,
    // Sequences.
    batch: u32,
    // attention_prefill: query blocks per (sequence, head); attention_decode: key splits per (query, head).
    blocks: u32,
    // attention_decode: keys per split.
    chunk: u32,
    // attention_decode with several splits: the f32 index in `partials` where the (max, sum) pairs start.
    stats_off: u32,
    // sparse_attention: the fraction of candidates kept, in (0, 1].
    sparsity: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<act>;
// Bindings 2 and 3, the keys and values, come with load_k4 / load_v4 from a cache_*.wgsl part.
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<act>;

// A masked key's score: it weighs exactly 0 (every weight is selected on `s > REAL`, never computed from NEG).
const NEG: f32 = -1.0e30;
const REAL: f32 = -5.0e29;

// Query elements i .. i + min(n, 4), zeros after them (read once per workgroup: scalar loads cost nothing here).
fn load_q4(i: u32, n: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < min(n, 4u); e++) {
        r[e] = f32(q[i + e]);
    }
    return r;
}

// Writes elements i .. i + min(n, 4) of the output.
fn store_out4(i: u32, n: u32, v: vec4<f32>) {
    for (var e = 0u; e < min(n, 4u); e++) {
        out[i + e] = act(v[e]);
    }
}
