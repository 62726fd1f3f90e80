// Shared by the attention kernels (attention.wgsl, sparse_attention.wgsl): one workgroup of WG threads per (query row,
// head), head_dim up to 256 (PER_THREAD output elements per thread), the query staged in workgroup memory, and a
// workgroup-wide reduction.

const WG: u32 = 64u;
const PER_THREAD: u32 = 4u;
const NEG: f32 = -1.0e30;

var<workgroup> qs: array<f32, 256>;
var<workgroup> probs: array<f32, 64>;
var<workgroup> red_f: array<f32, 64>;

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
