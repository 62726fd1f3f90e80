// Moves rows of activations (`act`, from the act part first in the module) between the layouts a compressed KV
// cache needs, and adds one buffer into another.
//   mode 0: dst = pair-major [batch, heads, capacity, head_dim] (the packed cache's row order), src = the attention
//           kernel's [batch, capacity, heads * head_dim], for positions t0 .. t0 + t_len.
//   mode 1: the reverse (pair-major src into the [batch, capacity, hidden] dst).
//   mode 2: dst[dst_off + i] += src[i] for i < n (a gathered positional embedding added to the residual stream).
//   mode 3: dense rows `[batch, t_len, heads * head_dim]` of src, from element dst_off on, into the
//           [batch, capacity, hidden] dst at positions t0 .. t0 + t_len (one step's keys or values, projected for a
//           whole block of GPU batches, into one batch's cache).
// Dispatch: ceil(n / 256) workgroups of 256, folded over x and y; n = batch * t_len * heads * head_dim in modes 0, 1.

struct Params {
    batch: u32,
    capacity: u32,
    heads: u32,
    head_dim: u32,
    t0: u32,
    t_len: u32,
    mode: u32,
    n: u32,
    dst_off: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<act>;
@group(0) @binding(2) var<storage, read_write> dst: array<act>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.n) {
        return;
    }
    if (params.mode == 2u) {
        dst[params.dst_off + i] = act(f32(dst[params.dst_off + i]) + f32(src[i]));
        return;
    }
    let d = i % params.head_dim;
    let h = (i / params.head_dim) % params.heads;
    let t = params.t0 + (i / (params.head_dim * params.heads)) % params.t_len;
    let b = i / (params.head_dim * params.heads * params.t_len);
    let cache = ((b * params.capacity + t) * params.heads + h) * params.head_dim + d;
    let pair = ((b * params.heads + h) * params.capacity + t) * params.head_dim + d;
    if (params.mode == 0u) {
        dst[pair] = src[cache];
    } else if (params.mode == 3u) {
        dst[cache] = src[params.dst_off + i];
    } else {
        dst[cache] = src[pair];
    }
}
