// KV cache access for f32 storage read as vec4 (one 16-byte load): bindings 2 (keys) and 3 (values) of the attention
// kernels when hidden and head_dim are multiples of 4, so that every head row starts 16-byte aligned. load_k4(i, n)
// returns elements i .. i + 4 (i is a multiple of 4; n, the elements left in the row, is then at least 4).
@group(0) @binding(2) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec4<f32>>;

fn load_k4(i: u32, n: u32) -> vec4<f32> {
    return kc[i >> 2u];
}

fn load_v4(i: u32, n: u32) -> vec4<f32> {
    return vc[i >> 2u];
}
