// Weight access for f16 storage, two halves packed per u32 (low half first), for any k. unpack2x16float needs no
// shader-f16 feature, so this works on every adapter.
@group(0) @binding(1) var<storage, read> w: array<u32>;

fn w_at(row: u32, col: u32) -> f32 {
    let i = row * params.k + col;
    return unpack2x16float(w[i >> 1u])[i & 1u];
}

// Elements col .. col + 4 of a row (col + 4 <= k).
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    return vec4<f32>(w_at(row, col), w_at(row, col + 1u), w_at(row, col + 2u), w_at(row, col + 3u));
}
