// y = (x - mean) / sqrt(var + eps) (* gamma + beta): one workgroup per row, two-pass mean and variance. x and y are
// activations (act, after the act part), gamma and beta f32; arithmetic is f32.

struct Params {
    rows: u32,
    width: u32,
    eps: f32,
    affine: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<act>;

var<workgroup> red: array<f32, 256>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red[lid] += red[lid + stride];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red[0]);
    // The next reduction overwrites red[0]: every thread must have read it first.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= params.rows) {
        return;
    }
    let width = params.width;
    let base = row * width;
    var s = 0.0;
    for (var i = lid; i < width; i += 256u) {
        s += f32(x[base + i]);
    }
    let mean = reduce_sum(lid, s) / f32(width);
    var s2 = 0.0;
    for (var i = lid; i < width; i += 256u) {
        let d = f32(x[base + i]) - mean;
        s2 += d * d;
    }
    let variance = reduce_sum(lid, s2) / f32(width);
    let rstd = inverseSqrt(variance + params.eps);
    for (var i = lid; i < width; i += 256u) {
        var v = (f32(x[base + i]) - mean) * rstd;
        if (params.affine != 0u) {
            v = v * gamma[i] + beta[i];
        }
        y[base + i] = act(v);
    }
}
