// q4_gemm: Y[m, o] = bias[o] + sum_i X[m, i] * W'[o, i] for prefill, W' read from strata's packed row-group format
// (runtime/src/compress.rs) and dequantised tile by tile into workgroup memory.
//
// Bindings (group 0): the same as q4_gemv.wgsl.
//   0 uniform  Params (below, 48 bytes; `batch` is m, the rows of X)
//   1 storage  read        w: array<u32>    the packed tensor, data section then scale section
//   2 storage  read        x: array<f32>    m rows of `cols` inputs, row r at r * x_stride
//   3 storage  read        bias: array<f32> `rows` values (any 4-byte buffer when has_bias = 0)
//   4 storage  read_write  y: array<f32>    m rows of `rows` outputs, row r at r * y_stride
// Pipeline constant: BITS (2, 4 or 8; default 4).
// Dispatch: (ceil(rows / 64), ceil(m / 64), 1) workgroups of 16 x 16 threads; each workgroup computes a 64 x 64
// output tile, each thread 4 x 4 outputs, stepping along the inputs 32 at a time (32 / (32 / BITS) words per row).
// f32 accumulation.

struct Params {
    rows: u32,            // output features (rows of W)
    cols: u32,            // input features
    batch: u32,           // m: rows of X and Y
    words_per_row: u32,
    groups_per_row: u32,
    words_per_group: u32,
    scale_offset: u32,
    has_bias: u32,
    x_stride: u32,
    y_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

override BITS: u32 = 4u;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Both tiles are stored k-major so the inner loop reads 4 consecutive m (or n) values.
var<workgroup> xs: array<f32, 2048>; // [TK][TM]
var<workgroup> ws: array<f32, 2048>; // [TK][TN]

@compute @workgroup_size(16, 16)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let vpw = 32u / BITS;
    let mask = (1u << BITS) - 1u;
    let words_per_tile_row = TK / vpw;
    let m0 = wid.y * TM;
    let n0 = wid.x * TN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }

    for (var k0 = 0u; k0 < p.cols; k0 += TK) {
        for (var e = li; e < TM * TK; e += 256u) {
            let mm = e / TK;
            let kk = e % TK;
            let gm = m0 + mm;
            let gk = k0 + kk;
            var v = 0.0;
            if gm < p.batch && gk < p.cols {
                v = x[gm * p.x_stride + gk];
            }
            xs[kk * TM + mm] = v;
        }
        for (var e = li; e < TN * words_per_tile_row; e += 256u) {
            let nn = e / words_per_tile_row;
            let kw = e % words_per_tile_row;
            let gn = n0 + nn;
            let gw = k0 / vpw + kw;
            var word = 0u;
            var sm = vec2<f32>(0.0);
            if gn < p.rows && gw < p.words_per_row {
                word = w[gn * p.words_per_row + gw];
                sm = unpack2x16float(w[p.scale_offset + gn * p.groups_per_row + gw / p.words_per_group]);
            }
            for (var j = 0u; j < vpw; j++) {
                let kk = kw * vpw + j;
                var v = 0.0;
                if k0 + kk < p.cols {
                    v = f32((word >> (j * BITS)) & mask) * sm.x + sm.y;
                }
                ws[kk * TN + nn] = v;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = vec4<f32>(xs[kk * TM + lid.y * 4u], xs[kk * TM + lid.y * 4u + 1u],
                              xs[kk * TM + lid.y * 4u + 2u], xs[kk * TM + lid.y * 4u + 3u]);
            let b = vec4<f32>(ws[kk * TN + lid.x * 4u], ws[kk * TN + lid.x * 4u + 1u],
                              ws[kk * TN + lid.x * 4u + 2u], ws[kk * TN + lid.x * 4u + 3u]);
            for (var i = 0u; i < 4u; i++) {
                acc[i * 4u] += a[i] * b.x;
                acc[i * 4u + 1u] += a[i] * b.y;
                acc[i * 4u + 2u] += a[i] * b.z;
                acc[i * 4u + 3u] += a[i] * b.w;
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let gm = m0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let gn = n0 + lid.x * 4u + j;
            if gm < p.batch && gn < p.rows {
                var v = acc[i * 4u + j];
                if p.has_bias != 0u {
                    v += bias[gn];
                }
                y[gm * p.y_stride + gn] = v;
            }
        }
    }
}
