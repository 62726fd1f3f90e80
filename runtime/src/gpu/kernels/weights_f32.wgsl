// Weight access for f32 storage (binding 1 of every kernel that reads a weight matrix): element (row, col) of a
// chunk with params.k columns. For any k; weights_f32x4.wgsl reads four at a time when k is a multiple of 4.
@group(0) @binding(1) var<storage, read> w: array<f32>;

fn w_at(row: u32, col: u32) -> f32 {
    return w[row * params.k + col];
}

// Elements col .. col + 4 of a row (col + 4 <= k).
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let i = row * params.k + col;
    return vec4<f32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
}
