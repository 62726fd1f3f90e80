// Weight access for f32 storage with k a multiple of 4: every row starts on a vec4, so w4_at is one 16-byte load.
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;

fn w_at(row: u32, col: u32) -> f32 {
    let i = row * params.k + col;
    return w[i >> 2u][i & 3u];
}

// Elements col .. col + 4 of a row, col a multiple of 4.
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    return w[(row * params.k + col) >> 2u];
}
