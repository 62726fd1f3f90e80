// KV cache access for f16 storage, two halves per u32 (low half first): bindings 2 (keys) and 3 (values) of the
// attention kernels. Half the bytes of an f32 cache in every tier and every transfer; unpack2x16float needs no
// shader-f16 feature, so this works on every adapter.
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;

fn load_k(i: u32) -> f32 {
    return unpack2x16float(kc[i >> 1u])[i & 1u];
}

fn load_v(i: u32) -> f32 {
    return unpack2x16float(vc[i >> 1u])[i & 1u];
}
