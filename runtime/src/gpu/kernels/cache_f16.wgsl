// KV cache access for f16 storage, two halves per u32 (low half first), read one value at a time: bindings 2 (keys)
// and 3 (values) of the attention kernels, for shapes whose head rows are not 8-byte aligned. Half the bytes of an f32
// cache in every tier and transfer; unpack2x16float needs no shader-f16 feature, so this works on every adapter.
// load_k4(i, n) returns elements i .. i + min(n, 4) and zeros after them.
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;

fn load_k4(i: u32, n: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < min(n, 4u); e++) {
        r[e] = unpack2x16float(kc[(i + e) >> 1u])[(i + e) & 1u];
    }
    return r;
}

fn load_v4(i: u32, n: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < min(n, 4u); e++) {
        r[e] = unpack2x16float(vc[(i + e) >> 1u])[(i + e) & 1u];
    }
    return r;
}
