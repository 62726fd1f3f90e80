// KV cache access for f32 storage: bindings 2 (keys) and 3 (values) of the attention kernels.
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;

fn load_k(i: u32) -> f32 {
    return kc[i];
}

fn load_v(i: u32) -> f32 {
    return vc[i];
}
