// KV cache access for f16 storage read four halves at a time (one 8-byte load of two packed pairs): bindings 2 (keys)
// and 3 (values) of the attention kernels when hidden and head_dim are multiples of 4. load_k4(i, n) returns elements
// i .. i + 4 (i is a multiple of 4). unpack2x16float needs no shader-f16 feature.
@group(0) @binding(2) var<storage, read> kc: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec2<u32>>;

fn load_k4(i: u32, n: u32) -> vec4<f32> {
    let w = kc[i >> 2u];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn load_v4(i: u32, n: u32) -> vec4<f32> {
    let w = vc[i >> 2u];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
