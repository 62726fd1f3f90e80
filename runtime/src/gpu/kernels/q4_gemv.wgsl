// q4_gemv: y[b, o] = bias[o] + sum_i x[b, i] * W'[o, i] for a few decode tokens, W' read from strata's packed
// row-group format (runtime/src/compress.rs: data words, then scale words `step | min << 16` as fp16 pairs).
//
// Bindings (group 0):
//   0 uniform  Params (below, 48 bytes)
//   1 storage  read        w: array<u32>   the packed tensor, data section then scale section
//   2 storage  read        x: array<f32>   batch rows of `cols` inputs, row b at b * x_stride
//   3 storage  read        bias: array<f32> `rows` values (any 4-byte buffer when has_bias = 0)
//   4 storage  read_write  y: array<f32>   batch rows of `rows` outputs, row b at b * y_stride
// Pipeline constants: BITS (2, 4 or 8; default 4); TOKENS (1..=8, default 1), the tokens one workgroup computes.
// Dispatch: n = ceil(rows / 8) workgroups of 256 threads per pass, laid out as (min(n, 65535), ceil(n / 65535),
// passes) with passes = ceil(batch / TOKENS); the kernel linearises x and y, and pass z takes tokens z * TOKENS..
// A pipeline with TOKENS = batch reads the weights once.
//
// Work distribution (the usual memory-bound GEMV shape): each workgroup owns 8 output rows, 32 threads per row.
// A row's threads stride its data words, thread `lane` taking words lane, lane + 32, ...: every iteration the 32
// threads read 32 consecutive words (128 coalesced bytes), and each word is decoded once and used for every token.
// Groups are whole words, so a word's scale word is one load, shared (broadcast) by the threads whose words fall in
// that group. x is read straight from memory (a decode step's x is a few KiB and stays cached; staging it in
// workgroup memory only adds barriers). The 32 partial sums per row and token are then added by a tree reduction
// in workgroup memory (no subgroup operations needed). TOKENS is a constant so every token loop unrolls and the
// accumulators stay in registers (a runtime token count made this kernel 5x slower on lavapipe, and a loop over
// passes inside the kernel 1.7x). f32 accumulation throughout; 8 KiB of workgroup memory.

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
override TOKENS: u32 = 1u;

const ROWS_PER_WG: u32 = 8u;
const LANES: u32 = 32u;     // threads per output row; ROWS_PER_WG * LANES = 256
const MAX_TOKENS: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Partial sums: token t of thread lid at t * 256 + lid (consecutive threads, consecutive addresses).
var<workgroup> partial: array<f32, MAX_TOKENS * 256u>;

// Adds the first `count` values of data word `k` of a row, times each token's x, to the token's sum.
fn add_word(
    row_words: u32,
    row_scales: u32,
    k: u32,
    count: u32,
    xrow: ptr<function, array<u32, MAX_TOKENS>>,
    acc: ptr<function, array<f32, MAX_TOKENS>>,
) {
    let word = w[row_words + k];
    let sm = unpack2x16float(w[row_scales + k / p.words_per_group]);
    let c0 = k * (32u / BITS);
    for (var j = 0u; j < count; j++) {
        let v = f32((word >> (j * BITS)) & ((1u << BITS) - 1u)) * sm.x + sm.y;
        for (var t = 0u; t < TOKENS; t++) {
            (*acc)[t] += v * x[(*xrow)[t] + c0 + j];
        }
    }
}

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let vpw = 32u / BITS;
    let lane = lid % LANES;
    let row = (wid.x + wid.y * nwg.x) * ROWS_PER_WG + lid / LANES;
    let live = row < p.rows;
    let row_words = row * p.words_per_row;
    let row_scales = p.scale_offset + row * p.groups_per_row;
    // Words whose values are all real columns; a last, partial word is handled apart so x is never read past cols.
    let full_words = p.cols / vpw;
    let tail = p.cols - full_words * vpw;

    let b0 = wid.z * TOKENS;
    if b0 >= p.batch {
        return;
    }
    // Where each token's x row starts; tokens past the batch re-read the last row and are never written.
    var xrow: array<u32, MAX_TOKENS>;
    var acc: array<f32, MAX_TOKENS>;
    for (var t = 0u; t < TOKENS; t++) {
        xrow[t] = min(b0 + t, p.batch - 1u) * p.x_stride;
        acc[t] = 0.0;
    }
    if live {
        for (var k = lane; k < full_words; k += LANES) {
            add_word(row_words, row_scales, k, vpw, &xrow, &acc);
        }
        if tail != 0u && lane == full_words % LANES {
            add_word(row_words, row_scales, full_words, tail, &xrow, &acc);
        }
    }
    for (var t = 0u; t < TOKENS; t++) {
        partial[t * 256u + lid] = acc[t];
    }
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            for (var t = 0u; t < TOKENS; t++) {
                partial[t * 256u + lid] += partial[t * 256u + lid + s];
            }
        }
        workgroupBarrier();
    }
    // Thread `lane` of each row writes token `lane`'s sum.
    if live && lane < min(TOKENS, p.batch - b0) {
        var sum = partial[lane * 256u + lid - lane];
        if p.has_bias != 0u {
            sum += bias[row];
        }
        y[(b0 + lane) * p.y_stride + row] = sum;
    }
}
