// q4_quantize: packs rows of activations into strata's row-group format (runtime/src/compress.rs) on the GPU, e.g. a
// decode step's new K and V rows appended to a packed cache that stays on the GPU. Same rule as the CPU quantizer: min
// rounded down and step = (max - min) / (2^BITS - 1) rounded up to fp16, never subnormal (a subnormal min becomes 0
// or -2^-14, a subnormal step 2^-14), q = clamp(round((x - min) / step), 0, 2^BITS - 1). Results can differ from the
// CPU's in the last bit of a step (WGSL division is not correctly rounded) or on exact .5 ties (WGSL rounds them to
// even); both stay within half a step. Inputs must be finite and within +-65504.
// The input rows are activations (`act`, from the act_f32 / act_f16 part first in the module); arithmetic is f32.
//
// Bindings (group 0):
//   0 uniform  Params (below, 48 bytes)
//   1 storage  read        input: array<act>  rows of `cols` values, row r at r * in_stride
//   2 storage  read_write  w: array<u32>      the packed tensor (data section, then scales at scale_offset)
// Input row r goes to packed row first_row + r * row_stride (FlexLLMGen's [seq, batch * heads, head_dim] cache:
// the rows of one new token are contiguous, row_stride = 1).
// Pipeline constant: BITS (2, 4 or 8; default 4).
// Dispatch: (ceil(groups_per_row / 64), rows, 1) workgroups of 64 threads; one thread per group.

struct Params {
    rows: u32,            // input rows to pack
    cols: u32,
    words_per_row: u32,
    groups_per_row: u32,
    words_per_group: u32,
    group_size: u32,
    scale_offset: u32,
    first_row: u32,
    row_stride: u32,
    in_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

override BITS: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> input: array<act>;
@group(0) @binding(2) var<storage, read_write> w: array<u32>;

fn f16_bits(x: f32) -> u32 {
    return pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu;
}

fn f16_value(h: u32) -> f32 {
    return unpack2x16float(h).x;
}

// The fp16 next to h, upwards or downwards.
fn f16_next(h: u32, up: bool) -> u32 {
    let magnitude = h & 0x7fffu;
    if magnitude == 0u {
        return select(0x8001u, 0x0001u, up);
    }
    let grow = up == ((h & 0x8000u) == 0u);
    return (h & 0x8000u) | select(magnitude - 1u, magnitude + 1u, grow);
}

fn is_subnormal(h: u32) -> bool {
    return (h & 0x7c00u) == 0u && (h & 0x03ffu) != 0u;
}

// The largest normal (or zero) fp16 not above x.
fn f16_down(x: f32) -> u32 {
    var h = f16_bits(x);
    if f16_value(h) > x {
        h = f16_next(h, false);
    }
    if is_subnormal(h) {
        h = select(0u, 0x8400u, (h & 0x8000u) != 0u);
    }
    return h;
}

// The smallest normal fp16 not below x (x > 0).
fn f16_up(x: f32) -> u32 {
    var h = f16_bits(x);
    if f16_value(h) < x {
        h = f16_next(h, true);
    }
    if is_subnormal(h) {
        h = 0x0400u;
    }
    return h;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let g = gid.x;
    let r = gid.y;
    if r >= p.rows || g >= p.groups_per_row {
        return;
    }
    let vpw = 32u / BITS;
    let levels = (1u << BITS) - 1u;
    let src = r * p.in_stride;
    let c0 = g * p.group_size;
    let c1 = min(c0 + p.group_size, p.cols);
    var mn = f32(input[src + c0]);
    var mx = mn;
    for (var c = c0 + 1u; c < c1; c++) {
        let x = f32(input[src + c]);
        mn = min(mn, x);
        mx = max(mx, x);
    }
    let min_h = f16_down(mn);
    let min_f = f16_value(min_h);
    let range = mx - min_f;
    var step_h = 0u;
    if range > 0.0 {
        step_h = f16_up(range / f32(levels));
    }
    let step_f = f16_value(step_h);
    let dst = p.first_row + r * p.row_stride;
    w[p.scale_offset + dst * p.groups_per_row + g] = step_h | (min_h << 16u);
    let base = dst * p.words_per_row + g * p.words_per_group;
    for (var kw = 0u; kw < p.words_per_group; kw++) {
        var word = 0u;
        for (var j = 0u; j < vpw; j++) {
            let c = c0 + kw * vpw + j;
            if c < c1 && step_f > 0.0 {
                let q = u32(clamp(round((f32(input[src + c]) - min_f) / step_f), 0.0, f32(levels)));
                word |= q << (j * BITS);
            }
        }
        w[base + kw] = word;
    }
}
