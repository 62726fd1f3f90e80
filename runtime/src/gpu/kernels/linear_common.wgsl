// Shared by every kernel that reads a weight matrix (the linear kernels, the split-K reduction, gather): the
// uniform, the bias / output / split-K bindings and the epilogue. A module is assembled from parts, in this order:
//   act_f32 or act_f16 (the `act` storage type; `enable f16;` must come first), `alias out_t = ...;` (the output's
//   storage type: act, or f32 for logits), the kernel's tile constants, an x part (x_scalar / x_vec4), a weights part
//   (weights_*.wgsl), this file, the kernel.

struct Params {
    // x is [m, k]; this dispatch computes output columns n0 .. n0 + n of the layer from a weight chunk [n, k].
    m: u32,
    n: u32,
    k: u32,
    n0: u32,
    // Output element (row r, column c) lives at (r / seg_len) * seg_stride + (r % seg_len + seg_off) * ldo + n0 + c:
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
    // Split-K: the number of k ranges (1: the kernel applies the epilogue itself) and the elements of each range.
    splits: u32,
    k_split: u32,
    // A packed weight's layout (weights_packed.wgsl); unused by dense weights.
    words_per_row: u32,
    groups_per_row: u32,
    words_per_group: u32,
    scale_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<out_t>;
// Split-K partial sums [splits, m, n] (linear::split_k_scratch_bytes), summed by splitk_reduce.wgsl.
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;

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

// Writes the finished dot product `acc` of output row r, chunk column c: bias, activation, placement, residual add.
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
        out[idx] = out_t(f32(out[idx]) + v);
    } else {
        out[idx] = out_t(v);
    }
}

// Split-K: the sum over k range `split` of output (r, c), before bias and the rest of the epilogue.
fn store_partial(split: u32, r: u32, c: u32, acc: f32) {
    partial[(split * params.m + r) * params.n + c] = acc;
}
