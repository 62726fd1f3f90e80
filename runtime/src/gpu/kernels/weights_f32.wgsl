// Weight access for f32 storage: binding 1 of every kernel that reads a weight matrix.
@group(0) @binding(1) var<storage, read> w: array<f32>;

fn load_w(i: u32) -> f32 {
    return w[i];
}

// Elements 2p and 2p + 1.
fn load_w2(p: u32) -> vec2<f32> {
    return vec2<f32>(w[2u * p], w[2u * p + 1u]);
}
