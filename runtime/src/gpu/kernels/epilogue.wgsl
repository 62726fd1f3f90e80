// Shared by the linear kernels: what happens to an output element after its dot product.

struct Params {
    // x is [m, k]; this dispatch computes output columns n0 .. n0 + n of a matrix chunk [n, k].
    m: u32,
    n: u32,
    k: u32,
    n0: u32,
    // Output element (row r, column c) lives at (r / seg_len) * seg_stride + (r % seg_len + seg_off) * ldo + c:
    // plain [m, ldo] by default, or rows scattered into a KV cache [batch, capacity, hidden] at the past length.
    ldo: u32,
    seg_len: u32,
    seg_stride: u32,
    seg_off: u32,
    has_bias: u32,
    // 0: none, 1: ReLU, 2: exact GELU.
    act: u32,
    // 1: add to what the output holds (a residual add).
    accumulate: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// erf(z), Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7.
fn erf_approx(z: f32) -> f32 {
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let r = 1.0 - poly * exp(-a * a);
    return select(r, -r, z < 0.0);
}

fn gelu(v: f32) -> f32 {
    return 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752));
}

// Writes the finished dot product `acc` of output row r, chunk column c.
fn store_output(r: u32, c: u32, acc: f32) {
    let col = params.n0 + c;
    var v = acc;
    if (params.has_bias != 0u) {
        v = v + bias[col];
    }
    if (params.act == 1u) {
        v = max(v, 0.0);
    } else if (params.act == 2u) {
        v = gelu(v);
    }
    let idx = (r / params.seg_len) * params.seg_stride + (r % params.seg_len + params.seg_off) * params.ldo + col;
    if (params.accumulate != 0u) {
        out[idx] = out[idx] + v;
    } else {
        out[idx] = v;
    }
}
