// q4_attention: decode attention over a packed KV cache (strata's row-group format, runtime/src/compress.rs, grouped
// along head_dim). For each (sequence b, head h): s[t] = scale * q . K'[t] over cached positions t < seq_len whose
// mask is set, p = softmax(s), out = sum_t p[t] * V'[t]. A sequence with every position masked gets zeros.
// Query and output are activations (`act`, from the act_f32 / act_f16 part first in the module); arithmetic is f32.
//
// Bindings (group 0):
//   0 uniform  Params (below, 64 bytes)
//   1 storage  read        query: array<act>   [batch * heads, head_dim] (the model's [batch, hidden] layout)
//   2 storage  read        k: array<u32>       packed K cache: data section, then scales at scale_offset
//   3 storage  read        v: array<u32>       packed V cache, the same layout as K
//   4 storage  read        mask: array<u32>    [batch, mask_stride], nonzero = attend (any 4-byte buffer if has_mask = 0)
//   5 storage  read_write  scores: array<f32>  scratch, batch * heads * seq_len values
//   6 storage  read_write  out: array<act>     [batch * heads, head_dim]
// Cache row of position t for pair bh = b * heads + h: t * token_stride + bh * bh_stride (FlexLLMGen's
// [seq, batch * heads, head_dim] cache: token_stride = batch * heads, bh_stride = 1).
// Pipeline constant: BITS (2, 4 or 8; default 4). head_dim <= 256.
// Dispatch: batch * heads workgroups of 256 threads as (min(n, 65535), ceil(n / 65535), 1).

struct Params {
    batch_heads: u32,     // (sequence, head) pairs
    heads: u32,           // heads per sequence (b = bh / heads indexes the mask)
    head_dim: u32,
    seq_len: u32,         // positions to attend over (the current token's K/V already in the cache)
    token_stride: u32,    // cache rows between consecutive positions of one pair
    bh_stride: u32,       // cache rows between consecutive pairs at one position
    words_per_row: u32,
    groups_per_row: u32,
    words_per_group: u32,
    scale_offset: u32,    // word index of the scale section (cache capacity rows * words_per_row)
    has_mask: u32,
    mask_stride: u32,     // elements between the mask rows of consecutive sequences
    scale: f32,           // score multiplier (1.0 when q is already scaled by head_dim^-0.5, as in OPT)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override BITS: u32 = 4u;

const WG: u32 = 256u;
const MASKED: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> query: array<act>;
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<act>;

var<workgroup> qs: array<f32, 256>;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let bh = wid.x + wid.y * nwg.x;
    if bh >= p.batch_heads {
        return;
    }
    let vpw = 32u / BITS;
    let qmask = (1u << BITS) - 1u;
    let b = bh / p.heads;
    let n_words = (p.head_dim + vpw - 1u) / vpw;
    let srow = bh * p.seq_len;

    for (var d = lid; d < p.head_dim; d += WG) {
        qs[d] = f32(query[bh * p.head_dim + d]);
    }
    workgroupBarrier();

    // Scores: one thread per position, decoding that position's key row.
    var local_max = MASKED;
    for (var t = lid; t < p.seq_len; t += WG) {
        var s = MASKED;
        if p.has_mask == 0u || mask[b * p.mask_stride + t] != 0u {
            let row = t * p.token_stride + bh * p.bh_stride;
            let base = row * p.words_per_row;
            let sbase = p.scale_offset + row * p.groups_per_row;
            var acc = 0.0;
            for (var kw = 0u; kw < n_words; kw++) {
                let word = k[base + kw];
                let sm = unpack2x16float(k[sbase + kw / p.words_per_group]);
                let c0 = kw * vpw;
                let n = min(vpw, p.head_dim - c0);
                for (var j = 0u; j < n; j++) {
                    acc += (f32((word >> (j * BITS)) & qmask) * sm.x + sm.y) * qs[c0 + j];
                }
            }
            s = acc * p.scale;
        }
        scores[srow + t] = s;
        local_max = max(local_max, s);
    }
    red[lid] = local_max;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();

    // Each thread exponentiates the scores it wrote itself.
    var local_sum = 0.0;
    for (var t = lid; t < p.seq_len; t += WG) {
        let s = scores[srow + t];
        var e = 0.0;
        if s > 0.5 * MASKED {
            e = exp(s - m);
        }
        scores[srow + t] = e;
        local_sum += e;
    }
    red[lid] = local_sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    // The weights written above are read by other threads below.
    storageBarrier();
    workgroupBarrier();

    // Weighted values: thread (lane, d) sums positions t = lane, lane + lanes, ... for output element d.
    let lanes = max(WG / max(p.head_dim, 1u), 1u);
    let d = lid % p.head_dim;
    let lane = lid / p.head_dim;
    var acc = 0.0;
    if lane < lanes {
        for (var t = lane; t < p.seq_len; t += lanes) {
            let e = scores[srow + t];
            if e != 0.0 {
                let row = t * p.token_stride + bh * p.bh_stride;
                let word = v[row * p.words_per_row + d / vpw];
                let sm = unpack2x16float(v[p.scale_offset + row * p.groups_per_row + d / vpw / p.words_per_group]);
                acc += e * (f32((word >> ((d % vpw) * BITS)) & qmask) * sm.x + sm.y);
            }
        }
    }
    red[lid] = acc;
    workgroupBarrier();
    if lid < p.head_dim {
        var sum = 0.0;
        for (var l = 0u; l < lanes; l++) {
            sum += red[l * p.head_dim + lid];
        }
        var o = 0.0;
        if total > 0.0 {
            o = sum / total;
        }
        out[bh * p.head_dim + lid] = act(o);
    }
}
