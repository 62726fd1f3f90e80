// Activation input x [m, k] of a linear kernel with k a multiple of 4: whole rows are vec4-aligned, so four
// elements come in one 16-byte (f32) or 8-byte (f16) load.
@group(0) @binding(2) var<storage, read> x: array<act4>;

fn x_at(i: u32) -> f32 {
    return f32(x[i >> 2u][i & 3u]);
}

// Elements i .. i + 4, i a multiple of 4.
fn x4_at(i: u32) -> vec4<f32> {
    return vec4<f32>(x[i >> 2u]);
}
