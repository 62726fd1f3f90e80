// out[t, :] (+)= table[ids[t], :] for the ids that fall in this chunk of the table (rows row0 .. row0 + chunk_rows).
// Token embedding (accumulate = 0) and learned positions (accumulate = 1) both use it.

struct Params {
    n_ids: u32,
    width: u32,
    row0: u32,
    chunk_rows: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.n_ids * params.width) {
        return;
    }
    let t = i / params.width;
    let c = i % params.width;
    let id = ids[t];
    if (id < params.row0 || id >= params.row0 + params.chunk_rows) {
        return;
    }
    let v = load_w((id - params.row0) * params.width + c);
    if (params.accumulate != 0u) {
        out[i] = out[i] + v;
    } else {
        out[i] = v;
    }
}
