// Weight access for f16 storage, two halves packed per u32 (low half first): binding 1 of every kernel that reads a
// weight matrix. unpack2x16float needs no shader-f16 feature, so this works on every adapter.
@group(0) @binding(1) var<storage, read> w: array<u32>;

fn load_w(i: u32) -> f32 {
    return unpack2x16float(w[i >> 1u])[i & 1u];
}

// Elements 2p and 2p + 1.
fn load_w2(p: u32) -> vec2<f32> {
    return unpack2x16float(w[p]);
}
