// Top-k sparse decode attention (--attn-sparsity < 1), FlexLLMGen's rule: the softmax is taken over every visible
// key, then only the new token and the k candidates with the largest scores contribute to the output (their weights
// are not renormalised). Candidates are the visible (unmasked) keys before the new token, n of them, and
// k = floor(sparsity * n) in f32, so padding never changes a sequence's result. Equal scores go to the earlier
// position (-0 and +0 are equal). One workgroup per (sequence, head); one query per sequence (the new token, at position `past`).
//
// The scores go to a scratch buffer; the k-th largest is found by bisection over the bits of an order-preserving
// u32 key of the f32 score (one counting pass per bit), then a second bisection over positions finds where the ties
// that still fit end. Every pass a thread makes reads only the positions it wrote itself.

struct Params {
    // Tokens in the cache before this step: the new token's key and value are at row `past`.
    past: u32,
    // Rows per sequence: k and v are [batch, capacity, hidden]; mask is [batch, capacity] (1 = real token);
    // scores is [batch * n_head, capacity].
    capacity: u32,
    hidden: u32,
    n_head: u32,
    head_dim: u32,
    // head_dim^-0.5, applied to q . k.
    scale: f32,
    batch: u32,
    // Fraction of candidates kept, in (0, 1].
    sparsity: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
// Bindings 2 and 3, the keys and values, come with load_k / load_v from cache_f32.wgsl or cache_f16.wgsl.
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

// WG, PER_THREAD, NEG, qs, probs and reduce_f come from attention_common.wgsl.
var<workgroup> red_u: array<u32, 64>;

// Monotone map of f32 onto u32 (Rust's f32::total_cmp order, with -0 taken as +0 so that zero scores tie): flip
// every bit of negatives, the sign bit of the rest.
fn order_key(s: f32) -> u32 {
    let b = select(bitcast<u32>(s), 0u, bitcast<u32>(s) == 0x80000000u);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn sum_u(lid: u32, v: u32) -> u32 {
    red_u[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red_u[lid] = red_u[lid] + red_u[lid + stride];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red_u[0]);
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let item = wid.x + wid.y * nwg.x;
    if (item >= params.batch * params.n_head) {
        return;
    }
    let b = item / params.n_head;
    let head = item % params.n_head;
    let pos = params.past;
    let len = pos + 1u;
    let d_len = params.head_dim;
    let q_base = b * params.hidden + head * d_len;
    for (var d = lid; d < d_len; d += WG) {
        qs[d] = q[q_base + d];
    }
    workgroupBarrier();

    let seq = b * params.capacity;
    let s_base = item * params.capacity;
    // Scores of the visible keys, their maximum, and how many candidates (visible keys before the new token).
    var m_local = NEG;
    var n_local = 0u;
    for (var j = lid; j < len; j += WG) {
        var s = NEG;
        if (mask[seq + j] != 0u) {
            let k_base = (seq + j) * params.hidden + head * d_len;
            var dot = 0.0;
            for (var d = 0u; d < d_len; d++) {
                dot = fma(qs[d], load_k(k_base + d), dot);
            }
            s = dot * params.scale;
            m_local = max(m_local, s);
            if (j < pos) {
                n_local += 1u;
            }
        }
        scores[s_base + j] = s;
    }
    let m = reduce_f(lid, m_local, true);
    let n = sum_u(lid, n_local);
    let k = min(n, u32(floor(params.sparsity * f32(n))));

    // A candidate is kept when its key is above t_key, or equal to it at a position below cut.
    var t_key = 0u;
    var cut = len;
    if (k == 0u) {
        t_key = 0xffffffffu;
        cut = 0u;
    } else if (k < n) {
        // The largest key with at least k candidates at or above it: the k-th largest.
        for (var bit = 0u; bit < 32u; bit++) {
            let trial = t_key | (0x80000000u >> bit);
            var c = 0u;
            for (var j = lid; j < pos; j += WG) {
                if (mask[seq + j] != 0u && order_key(scores[s_base + j]) >= trial) {
                    c += 1u;
                }
            }
            if (sum_u(lid, c) >= k) {
                t_key = trial;
            }
        }
        var gt = 0u;
        var eq = 0u;
        for (var j = lid; j < pos; j += WG) {
            if (mask[seq + j] != 0u) {
                let key = order_key(scores[s_base + j]);
                gt += select(0u, 1u, key > t_key);
                eq += select(0u, 1u, key == t_key);
            }
        }
        let above = sum_u(lid, gt);
        let ties = sum_u(lid, eq);
        // Slots left for keys equal to the threshold (at least one): they go to the earliest positions.
        let r = k - above;
        if (ties > r) {
            // The largest c with fewer than r ties before position c: position c holds the r-th tie.
            var c = 0u;
            for (var bit = 0u; bit < 32u; bit++) {
                let trial = c + (0x80000000u >> bit);
                if (trial <= pos) {
                    var e = 0u;
                    for (var j = lid; j < trial; j += WG) {
                        if (mask[seq + j] != 0u && order_key(scores[s_base + j]) == t_key) {
                            e += 1u;
                        }
                    }
                    if (sum_u(lid, e) < r) {
                        c = trial;
                    }
                }
            }
            cut = c + 1u;
        }
    }

    // The softmax denominator covers every visible key, kept or not.
    var l_local = 0.0;
    for (var j = lid; j < len; j += WG) {
        if (mask[seq + j] != 0u) {
            l_local += exp(scores[s_base + j] - m);
        }
    }
    let l = reduce_f(lid, l_local, false);

    var acc: array<f32, 4>;
    for (var c = 0u; c < PER_THREAD; c++) {
        acc[c] = 0.0;
    }
    for (var j0 = 0u; j0 < len; j0 += WG) {
        let j = j0 + lid;
        var p = 0.0;
        if (j < len && mask[seq + j] != 0u) {
            let s = scores[s_base + j];
            let key = order_key(s);
            if (j == pos || key > t_key || (key == t_key && j < cut)) {
                p = exp(s - m);
            }
        }
        probs[lid] = p;
        workgroupBarrier();
        let n_keys = min(WG, len - j0);
        for (var c = 0u; c < PER_THREAD; c++) {
            let d = lid + c * WG;
            if (d < d_len) {
                var a = acc[c];
                for (var jj = 0u; jj < n_keys; jj++) {
                    let pj = probs[jj];
                    if (pj != 0.0) {
                        a = fma(pj, load_v((seq + j0 + jj) * params.hidden + head * d_len + d), a);
                    }
                }
                acc[c] = a;
            }
        }
        workgroupBarrier();
    }
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var c = 0u; c < PER_THREAD; c++) {
        let d = lid + c * WG;
        if (d < d_len) {
            out[q_base + d] = acc[c] * inv;
        }
    }
}
