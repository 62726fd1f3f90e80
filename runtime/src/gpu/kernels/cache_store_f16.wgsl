// Writes one step's keys or values into an f16 KV cache: src is [batch * s_new, hidden] activations (`act`, from
// the act_f32/act_f16 part first in the module) starting at row src_row0, dst is [batch, capacity, hidden] halves
// packed two per u32, and row src_row0 + b * s_new + i (row i of sequence b) lands at position past + i. One thread
// per pair of halves, so no two threads write one word; hidden is even.

struct Params {
    batch: u32,
    s_new: u32,
    past: u32,
    capacity: u32,
    hidden: u32,
    // batch * s_new * hidden / 2
    n: u32,
    // The first source row: src holds other rows before this step's (a whole block's projection).
    src_row0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<act2>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let p = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (p >= params.n) {
        return;
    }
    let pairs_per_row = params.hidden / 2u;
    let row = p / pairs_per_row;
    let col = p % pairs_per_row;
    let b = row / params.s_new;
    let i = row % params.s_new;
    let at = (b * params.capacity + params.past + i) * pairs_per_row + col;
    dst[at] = pack2x16float(vec2<f32>(src[params.src_row0 * pairs_per_row + p]));
}
