// Activation input x [m, k] of a linear kernel, read one element at a time (k not a multiple of 4).
@group(0) @binding(2) var<storage, read> x: array<act>;

fn x_at(i: u32) -> f32 {
    return f32(x[i]);
}

// Elements i .. i + 4 (only for i + 4 <= m * k).
fn x4_at(i: u32) -> vec4<f32> {
    return vec4<f32>(f32(x[i]), f32(x[i + 1u]), f32(x[i + 2u]), f32(x[i + 3u]));
}
