// Causal attention with a padding mask over a KV cache, flash-decoding style (decode: one query per sequence, any
// number of cached keys). The keys a query sees are split over `blocks` workgroups of `chunk` keys each, so that a
// small batch still fills the GPU; one workgroup per (query row, head, split).
//
// Lanes run across head_dim: a group of LANES threads reads one key (or value) row as vec4s, LANES * 16 contiguous
// bytes (8 per lane from an f16 cache), and WG / LANES groups take different keys. A tile of TK keys: each lane's
// partial q . k goes to workgroup memory, TK threads add one key's partials, and each group keeps an online softmax
// (running max, sum, output in its lanes) over its own keys of the tile. The groups are merged at the end, as the
// combine pass merges splits.
//
// With one split the workgroup writes the normalised output. With several it writes its unnormalised output and
// (running max, sum) to `partials` (index (pair * blocks + split) * head_dim, and stats_off + 2 * (pair * blocks +
// split), pair = row * n_head + head), and attention_combine.wgsl merges them. An empty or fully masked split leaves
// (NEG, 0) and zeros, which weigh nothing in the merge; a query with no visible key yields zeros.
// Dispatch: batch * s_new * n_head * blocks workgroups, folded over x and y.

override WG: u32 = 128u;
override D4_MAX: u32 = 32u;
override LANES: u32 = 32u;
override TK: u32 = 32u;

override GROUPS: u32 = WG / LANES;
override RD: u32 = (D4_MAX + LANES - 1u) / LANES;
override PART_STRIDE: u32 = LANES + 1u;

@group(0) @binding(6) var<storage, read_write> partials: array<f32>;

var<workgroup> part: array<f32, TK * PART_STRIDE>;
var<workgroup> sc: array<f32, TK>;
var<workgroup> acc_g: array<vec4<f32>, GROUPS * D4_MAX>;
var<workgroup> m_g: array<f32, GROUPS>;
var<workgroup> l_g: array<f32, GROUPS>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let item = wid.x + wid.y * nwg.x;
    if (item >= params.batch * params.s_new * params.n_head * params.blocks) {
        return;
    }
    let split = item % params.blocks;
    let pair = item / params.blocks;
    let head = pair % params.n_head;
    let row = pair / params.n_head;
    let b = row / params.s_new;
    let pos = params.past + row % params.s_new;
    let key_begin = split * params.chunk;
    let key_end = min(key_begin + params.chunk, pos + 1u);
    let d_len = params.head_dim;
    let d4 = (d_len + 3u) / 4u;
    let seq = b * params.capacity;
    let col0 = head * d_len;
    let lane = lid % LANES;
    let g = lid / LANES;
    // Lanes that hold some of the head's columns. Loops that index no register array run to such runtime counts
    // (keys in the tile, lanes used, groups that got keys): they skip dead work, and fully unrolled
    // pipeline-constant loops cost lavapipe's compiler about 4x the time.
    let lanes = min(LANES, d4);

    var qv: array<vec4<f32>, 2>;
    var acc: array<vec4<f32>, 2>;
    for (var w = 0u; w < RD; w++) {
        let c = lane + LANES * w;
        qv[w] = vec4<f32>(0.0);
        if (c < d4) {
            qv[w] = load_q4(row * params.hidden + col0 + 4u * c, d_len - 4u * c);
        }
        acc[w] = vec4<f32>(0.0);
    }
    var m = NEG;
    var l = 0.0;

    for (var j0 = key_begin; j0 < key_end; j0 += TK) {
        let n_k = min(TK, key_end - j0);
        // Group g's keys j0 + g + GROUPS * u: each lane's part of q . k.
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
        if (lid < n_k) {
            var s = NEG;
            if (mask[seq + j0 + lid] != 0u) {
                var t = 0.0;
                for (var x = 0u; x < lanes; x++) {
                    t += part[lid * PART_STRIDE + x];
                }
                s = t * params.scale;
            }
            sc[lid] = s;
        }
        workgroupBarrier();
        // Group g's running max, sum and output over its own keys (merged with the other groups' at the end).
        var mt = NEG;
        for (var jj = g; jj < n_k; jj += GROUPS) {
            mt = max(mt, sc[jj]);
        }
        if (mt > REAL) {
            let m_new = max(m, mt);
            let corr = exp(m - m_new);
            m = m_new;
            l *= corr;
            for (var w = 0u; w < RD; w++) {
                acc[w] *= corr;
            }
            for (var jj = g; jj < n_k; jj += GROUPS) {
                let s = sc[jj];
                if (s > REAL) {
                    let p = exp(s - m);
                    l += p;
                    let base = (seq + j0 + jj) * params.hidden + col0;
                    for (var w = 0u; w < RD; w++) {
                        let c = lane + LANES * w;
                        if (c < d4) {
                            acc[w] = fma(vec4<f32>(p), load_v4(base + 4u * c, d_len - 4u * c), acc[w]);
                        }
                    }
                }
            }
        }
    }

    // The groups merged: each group's lanes hold the same m and l.
    for (var w = 0u; w < RD; w++) {
        let c = lane + LANES * w;
        if (c < d4) {
            acc_g[g * D4_MAX + c] = acc[w];
        }
    }
    if (lane == 0u) {
        m_g[g] = m;
        l_g[g] = l;
    }
    workgroupBarrier();
    // Groups past the split's first keys saw none.
    let groups = min(GROUPS, max(key_end, key_begin) - key_begin);
    var m_all = NEG;
    for (var t = 0u; t < groups; t++) {
        m_all = max(m_all, m_g[t]);
    }
    var l_all = 0.0;
    for (var t = 0u; t < groups; t++) {
        l_all += l_g[t] * exp(m_g[t] - m_all);
    }
    for (var c = lid; c < d4; c += WG) {
        var o = vec4<f32>(0.0);
        for (var t = 0u; t < groups; t++) {
            o = fma(vec4<f32>(exp(m_g[t] - m_all)), acc_g[t * D4_MAX + c], o);
        }
        if (params.blocks == 1u) {
            store_out4(row * params.hidden + col0 + 4u * c, d_len - 4u * c,
                       o * select(0.0, 1.0 / l_all, l_all > 0.0));
        } else {
            let at = (pair * params.blocks + split) * d_len + 4u * c;
            for (var e = 0u; e < min(d_len - 4u * c, 4u); e++) {
                partials[at + e] = o[e];
            }
        }
    }
    if (params.blocks > 1u && lid == 0u) {
        let at = params.stats_off + 2u * (pair * params.blocks + split);
        partials[at] = m_all;
        partials[at + 1u] = l_all;
    }
}
