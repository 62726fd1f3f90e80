// Weight access for a group-wise quantised chunk (crate::compress's layout: data words, then one scale word
// `step | min << 16` per group at params.scale_offset): element (row, col) decodes as q * step + min. A word holds
// 32 / BITS values (a multiple of 4) and lies inside one group, so four values col .. col + 4 (col a multiple of 4)
// come from one data word and one scale word. Values past a row's last column are padding: finite, and the kernels
// multiply them by zero-filled x.
override BITS: u32 = 4u;

@group(0) @binding(1) var<storage, read> w: array<u32>;

fn w_scale(row: u32, word: u32) -> vec2<f32> {
    return unpack2x16float(w[params.scale_offset + row * params.groups_per_row + word / params.words_per_group]);
}

fn w_at(row: u32, col: u32) -> f32 {
    let vpw = 32u / BITS;
    let word = col / vpw;
    let data = w[row * params.words_per_row + word];
    let q = (data >> ((col % vpw) * BITS)) & ((1u << BITS) - 1u);
    let sm = w_scale(row, word);
    return f32(q) * sm.x + sm.y;
}

// Elements col .. col + 4 of a row, col a multiple of 4.
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let vpw = 32u / BITS;
    let word = col / vpw;
    let data = w[row * params.words_per_row + word] >> ((col % vpw) * BITS);
    let mask = (1u << BITS) - 1u;
    let q = vec4<u32>(data, data >> BITS, data >> (2u * BITS), data >> (3u * BITS)) & vec4<u32>(mask);
    let sm = w_scale(row, word);
    return vec4<f32>(q) * sm.x + sm.y;
}
