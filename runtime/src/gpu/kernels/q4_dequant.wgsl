// q4_dequant: out[r, c] = W'[src(r), c], decoding rows of strata's packed row-group format (runtime/src/compress.rs)
// into activations (`act`, from the act_f32 / act_f16 part first in the module; arithmetic is f32). src(r) =
// first_row + r (a range of KV cache rows), or ids[r] when use_ids = 1 (an embedding lookup: token ids into the
// packed token embedding, position ids into the packed positional table).
//
// Bindings (group 0):
//   0 uniform  Params (below, 32 bytes)
//   1 storage  read        w: array<u32>   the packed tensor, data section then scale section
//   2 storage  read        ids: array<u32> source rows (any 4-byte buffer when use_ids = 0)
//   3 storage  read_write  out: array<act> out_rows rows of `cols` values, row r at r * out_stride
// Pipeline constant: BITS (2, 4 or 8; default 4).
// Dispatch: (ceil(ceil(cols / (32 / BITS)) / 64), out_rows, 1) workgroups of 64 threads; one thread per data word.

struct Params {
    out_rows: u32,        // rows to produce
    cols: u32,            // elements per row
    words_per_row: u32,
    groups_per_row: u32,
    words_per_group: u32,
    scale_offset: u32,    // = rows of the packed tensor * words_per_row
    first_row: u32,       // source of output row 0 when use_ids = 0
    use_ids: u32,         // 0: a range of rows; 1: rows listed in ids
    out_stride: u32,      // elements between output rows (>= cols)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override BITS: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let vpw = 32u / BITS;
    let mask = (1u << BITS) - 1u;
    let k = gid.x;
    let r = gid.y;
    let c0 = k * vpw;
    if r >= p.out_rows || c0 >= p.cols {
        return;
    }
    var src = p.first_row + r;
    if p.use_ids != 0u {
        src = ids[r];
    }
    let word = w[src * p.words_per_row + k];
    let sm = unpack2x16float(w[p.scale_offset + src * p.groups_per_row + k / p.words_per_group]);
    let n = min(vpw, p.cols - c0);
    for (var j = 0u; j < n; j++) {
        out[r * p.out_stride + c0 + j] = act(f32((word >> (j * BITS)) & mask) * sm.x + sm.y);
    }
}
