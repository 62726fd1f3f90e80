// Top-k sparse decode attention (--attn-sparsity < 1), FlexLLMGen's rule: the softmax is taken over every visible
// key, then only the new token and the k candidates with the largest scores contribute to the output (their weights
// are not renormalised). Candidates are the visible (unmasked) keys before the new token, n of them, and
// k = floor(sparsity * n) in f32, so padding never changes a sequence's result. Equal scores go to the earlier
// position (-0 and +0 are equal). One workgroup per (sequence, head); one query per sequence (the new token, at
// position `past`).
//
// Keys and values are read as attention_decode.wgsl reads them: groups of LANES lanes across head_dim, one row as
// contiguous vec4s, partial dot products added in workgroup memory. The scores go to a scratch buffer; the k-th
// largest is found by bisection over the bits of an order-preserving u32 key of the f32 score (one counting pass per
// bit), then a second bisection over positions finds where the ties that still fit end.

override WG: u32 = 128u;
override D4_MAX: u32 = 32u;
override LANES: u32 = 32u;
override TK: u32 = 32u;

override GROUPS: u32 = WG / LANES;
override RD: u32 = (D4_MAX + LANES - 1u) / LANES;
override PART_STRIDE: u32 = LANES + 1u;

// [batch * n_head, capacity] scores.
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;

var<workgroup> part: array<f32, TK * PART_STRIDE>;
var<workgroup> acc_g: array<vec4<f32>, GROUPS * D4_MAX>;
var<workgroup> red_f: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;

// Monotone map of f32 onto u32 (Rust's f32::total_cmp order, with -0 taken as +0 so that zero scores tie): flip
// every bit of negatives, the sign bit of the rest.
fn order_key(s: f32) -> u32 {
    let b = select(bitcast<u32>(s), 0u, bitcast<u32>(s) == 0x80000000u);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// The maximum (take_max) or the sum of v over the workgroup, the same value in every thread.
fn reduce_f(lid: u32, v: f32, take_max: bool) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            if (take_max) {
                red_f[lid] = max(red_f[lid], red_f[lid + stride]);
            } else {
                red_f[lid] = red_f[lid] + red_f[lid + stride];
            }
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red_f[0]);
    workgroupBarrier();
    return total;
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

@compute @workgroup_size(WG)
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
    let d4 = (d_len + 3u) / 4u;
    let col0 = head * d_len;
    let seq = b * params.capacity;
    let s_base = item * params.capacity;
    let lane = lid % LANES;
    let g = lid / LANES;
    // Runtime loop bounds where no register array is indexed, as in attention_decode.wgsl.
    let lanes = min(LANES, d4);

    var qv: array<vec4<f32>, 2>;
    for (var w = 0u; w < RD; w++) {
        let c = lane + LANES * w;
        qv[w] = vec4<f32>(0.0);
        if (c < d4) {
            qv[w] = load_q4(b * params.hidden + col0 + 4u * c, d_len - 4u * c);
        }
    }

    // Scores of the visible keys, TK at a time, their maximum, and how many candidates (visible keys before the new
    // token).
    var m_local = NEG;
    var n_local = 0u;
    for (var j0 = 0u; j0 < len; j0 += TK) {
        let n_k = min(TK, len - j0);
        for (var jj = g; jj < n_k; jj += GROUPS) {
            let j = j0 + jj;
            var pd = 0.0;
            if (mask[seq + j] != 0u) {
                let base = (seq + j) * params.hidden + col0;
                for (var w = 0u; w < RD; w++) {
                    let c = lane + LANES * w;
                    if (c < d4) {
                        pd += dot(qv[w], load_k4(base + 4u * c, d_len - 4u * c));
                    }
                }
            }
            part[jj * PART_STRIDE + lane] = pd;
        }
        workgroupBarrier();
        let j = j0 + lid;
        if (lid < n_k) {
            var s = NEG;
            if (mask[seq + j] != 0u) {
                var t = 0.0;
                for (var x = 0u; x < lanes; x++) {
                    t += part[lid * PART_STRIDE + x];
                }
                s = t * params.scale;
                m_local = max(m_local, s);
                if (j < pos) {
                    n_local += 1u;
                }
            }
            scores[s_base + j] = s;
        }
        workgroupBarrier();
    }
    // The passes below read scores other threads wrote.
    storageBarrier();
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

    // Kept keys' weighted value rows: group g takes keys g, g + GROUPS, ..., its lanes across head_dim.
    var acc: array<vec4<f32>, 2>;
    for (var w = 0u; w < RD; w++) {
        acc[w] = vec4<f32>(0.0);
    }
    for (var j = g; j < len; j += GROUPS) {
        if (mask[seq + j] != 0u) {
            let s = scores[s_base + j];
            let key = order_key(s);
            if (j == pos || key > t_key || (key == t_key && j < cut)) {
                let p = exp(s - m);
                let base = (seq + j) * params.hidden + col0;
                for (var w = 0u; w < RD; w++) {
                    let c = lane + LANES * w;
                    if (c < d4) {
                        acc[w] = fma(vec4<f32>(p), load_v4(base + 4u * c, d_len - 4u * c), acc[w]);
                    }
                }
            }
        }
    }
    for (var w = 0u; w < RD; w++) {
        let c = lane + LANES * w;
        if (c < d4) {
            acc_g[g * D4_MAX + c] = acc[w];
        }
    }
    workgroupBarrier();
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var c = lid; c < d4; c += WG) {
        var o = vec4<f32>(0.0);
        for (var t = 0u; t < min(GROUPS, len); t++) {
            o += acc_g[t * D4_MAX + c];
        }
        store_out4(b * params.hidden + col0 + 4u * c, d_len - 4u * c, o * inv);
    }
}
