// Weight access for f16 storage with k a multiple of 4: four halves (8 bytes) per load, unpacked to f32.
@group(0) @binding(1) var<storage, read> w: array<vec2<u32>>;

fn w_at(row: u32, col: u32) -> f32 {
    let i = row * params.k + col;
    return unpack2x16float(w[i >> 2u][(i >> 1u) & 1u])[i & 1u];
}

// Elements col .. col + 4 of a row, col a multiple of 4.
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let p = w[(row * params.k + col) >> 2u];
    return vec4<f32>(unpack2x16float(p.x), unpack2x16float(p.y));
}
