// KV cache access for f32 storage read one value at a time: bindings 2 (keys) and 3 (values) of the attention kernels,
// for shapes whose head rows are not 16-byte aligned (hidden or head_dim not a multiple of 4). load_k4(i, n) returns
// elements i .. i + min(n, 4) of the cache and zeros after them (the tail of a head row).
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;

fn load_k4(i: u32, n: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < min(n, 4u); e++) {
        r[e] = kc[i + e];
    }
    return r;
}

fn load_v4(i: u32, n: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < min(n, 4u); e++) {
        r[e] = vc[i + e];
    }
    return r;
}
