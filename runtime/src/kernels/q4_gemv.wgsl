// q4_gemv: y[b, o] = bias[o] + sum_i x[b, i] * W'[o, i] for a few decode tokens, W' read from strata's packed
// row-group format (runtime/src/compress.rs: data words, then scale words `step | min << 16` as fp16 pairs).
//
// Bindings (group 0):
//   0 uniform  Params (below, 48 bytes)
//   1 storage  read        w: array<u32>   the packed tensor, data section then scale section
//   2 storage  read        x: array<f32>   batch rows of `cols` inputs, row b at b * x_stride
//   3 storage  read        bias: array<f32> `rows` values (any 4-byte buffer when has_bias = 0)
//   4 storage  read_write  y: array<f32>   batch rows of `rows` outputs, row b at b * y_stride
// Pipeline constant: BITS (2, 4 or 8; default 4).
// Dispatch: ceil(rows / 4) workgroups of 256 threads, laid out as (min(n, 65535), ceil(n / 65535), 1); the kernel
// linearises the grid. Each workgroup owns 4 output rows; 64 threads per row stride along the row's words. The
// inputs go through workgroup memory 512 columns at a time (coalesced loads, shared by the 4 rows), 4 tokens at a
// time (one vec4 per column); partial sums are reduced in workgroup memory. f32 accumulation. 12 KiB of
// workgroup memory.

struct Params {
    rows: u32,            // output features (rows of W)
    cols: u32,            // input features
    batch: u32,           // tokens (rows of x and y)
    words_per_row: u32,   // data words per row
    groups_per_row: u32,  // groups (scale words) per row
    words_per_group: u32, // data words per group = group_size * BITS / 32
    scale_offset: u32,    // word index of the scale section = rows * words_per_row
    has_bias: u32,        // 0 or 1
    x_stride: u32,        // elements between rows of x (>= cols)
    y_stride: u32,        // elements between rows of y (>= rows)
    _pad0: u32,
    _pad1: u32,
}

override BITS: u32 = 4u;

const ROWS_PER_WG: u32 = 4u;
const LANES: u32 = 64u;
const CHUNK: u32 = 512u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Inputs of 4 tokens for CHUNK columns (zero past `cols`, so padded weights contribute nothing).
var<workgroup> xt: array<vec4<f32>, 512>;
var<workgroup> partial: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let vpw = 32u / BITS;
    let mask = (1u << BITS) - 1u;
    let block = wid.x + wid.y * nwg.x;
    let lane = lid % LANES;
    let row = block * ROWS_PER_WG + lid / LANES;
    let live = row < p.rows;
    let row_words = row * p.words_per_row;
    let row_scales = p.scale_offset + row * p.groups_per_row;
    let n_words = (p.cols + vpw - 1u) / vpw;
    let last_b = max(p.batch, 1u) - 1u;

    for (var b0 = 0u; b0 < p.batch; b0 += 4u) {
        // Tokens past the batch re-read the last one; their sums are never written.
        let x0 = min(b0, last_b) * p.x_stride;
        let x1 = min(b0 + 1u, last_b) * p.x_stride;
        let x2 = min(b0 + 2u, last_b) * p.x_stride;
        let x3 = min(b0 + 3u, last_b) * p.x_stride;
        var acc = vec4<f32>(0.0);
        for (var c_base = 0u; c_base < p.cols; c_base += CHUNK) {
            for (var c = lid; c < CHUNK; c += 256u) {
                let col = c_base + c;
                var v = vec4<f32>(0.0);
                if col < p.cols {
                    v = vec4<f32>(x[x0 + col], x[x1 + col], x[x2 + col], x[x3 + col]);
                }
                xt[c] = v;
            }
            workgroupBarrier();
            if live {
                let k_begin = c_base / vpw;
                let k_end = min(k_begin + CHUNK / vpw, n_words);
                for (var k = k_begin + lane; k < k_end; k += LANES) {
                    let word = w[row_words + k];
                    let sm = unpack2x16float(w[row_scales + k / p.words_per_group]);
                    let lc = k * vpw - c_base;
                    for (var j = 0u; j < vpw; j++) {
                        let v = f32((word >> (j * BITS)) & mask) * sm.x + sm.y;
                        acc += v * xt[lc + j];
                    }
                }
            }
            workgroupBarrier();
        }
        partial[lid] = acc;
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if lane < s {
                partial[lid] += partial[lid + s];
            }
            workgroupBarrier();
        }
        if live && lane == 0u {
            var sum = partial[lid];
            if p.has_bias != 0u {
                sum += vec4<f32>(bias[row]);
            }
            let count = min(4u, p.batch - b0);
            for (var t = 0u; t < count; t++) {
                y[(b0 + t) * p.y_stride + row] = sum[t];
            }
        }
        workgroupBarrier();
    }
}
