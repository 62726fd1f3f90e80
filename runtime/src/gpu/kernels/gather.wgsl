// out[t, :] (+)= table[ids[t], :] for the ids that fall in this chunk of the table: embedding lookups (token rows;
// learned positions with accumulate = 1). The table is read through a weights part (f32, f16 or packed rows, so a
// packed embedding is decoded here) and linear_common's Params: m = number of ids, k = the table's width, n0 =
// the chunk's first row, n = its rows, accumulate. out (binding 4) holds activations (out_t = act).

@group(0) @binding(2) var<storage, read> ids: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    let width = params.k;
    if (i >= params.m * width) {
        return;
    }
    let t = i / width;
    let c = i % width;
    let id = ids[t];
    if (id < params.n0 || id >= params.n0 + params.n) {
        return;
    }
    let v = w_at(id - params.n0, c);
    if (params.accumulate != 0u) {
        out[i] = out_t(f32(out[i]) + v);
    } else {
        out[i] = out_t(v);
    }
}
