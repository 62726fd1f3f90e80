// Next-token choice from logits [rows, vocab]: one workgroup per row. `argmax` (greedy; ties go to the lowest id, as
// torch.argmax) and `sample` (temperature, then top-p: keep the most probable tokens whose mass reaches top_p, then
// draw with a counter-based generator seeded by (seed, step, row), so a run is reproducible).

struct Params {
    rows: u32,
    vocab: u32,
    temperature: f32,
    top_p: f32,
    seed: u32,
    step: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> next_ids: array<u32>;

const WG: u32 = 256u;
var<workgroup> red_v: array<f32, 256>;
var<workgroup> red_i: array<u32, 256>;
var<workgroup> red_s: array<f32, 256>;

// Index of the maximum over this row; thread `lid` holds candidate (v, i). Ties and NaN resolve to the lowest index.
fn argmax_reduce(lid: u32, v: f32, i: u32) -> u32 {
    red_v[lid] = v;
    red_i[lid] = i;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let ov = red_v[lid + stride];
            let oi = red_i[lid + stride];
            if (ov > red_v[lid] || (ov == red_v[lid] && oi < red_i[lid])) {
                red_v[lid] = ov;
                red_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    let best = workgroupUniformLoad(&red_i[0]);
    workgroupBarrier();
    return best;
}

fn row_argmax(lid: u32, base: u32) -> u32 {
    var best_v = -3.4e38;
    var best_i = 0xffffffffu;
    for (var i = lid; i < params.vocab; i += WG) {
        let v = logits[base + i];
        // Strictly greater keeps the first index among equal values; NaN never wins.
        if (v > best_v || best_i == 0xffffffffu) {
            if (v == v) {
                best_v = v;
                best_i = i;
            }
        }
    }
    return argmax_reduce(lid, best_v, best_i);
}

@compute @workgroup_size(256)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if (row >= params.rows) {
        return;
    }
    let best = row_argmax(lid, row * params.vocab);
    if (lid == 0u) {
        next_ids[row] = min(best, params.vocab - 1u);
    }
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red_s[lid] = v;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red_s[lid] += red_s[lid + stride];
        }
        workgroupBarrier();
    }
    let total = workgroupUniformLoad(&red_s[0]);
    workgroupBarrier();
    return total;
}

fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Unnormalised probability relative to the most likely token, in (0, 1].
fn weight(base: u32, i: u32, mx: f32) -> f32 {
    let v = logits[base + i];
    if (v != v) {
        return 0.0;
    }
    return exp((v - mx) / params.temperature);
}

// Kept mass: sum of weights >= tau.
fn mass_above(lid: u32, base: u32, mx: f32, tau: f32) -> f32 {
    var s = 0.0;
    for (var i = lid; i < params.vocab; i += WG) {
        let p = weight(base, i, mx);
        if (p >= tau) {
            s += p;
        }
    }
    return reduce_sum(lid, s);
}

@compute @workgroup_size(256)
fn sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    if (row >= params.rows) {
        return;
    }
    let base = row * params.vocab;
    let top = row_argmax(lid, base);
    let mx = logits[base + top];
    let total = mass_above(lid, base, mx, 0.0);
    // Largest threshold tau whose kept mass still reaches top_p of the total, by bisection on (0, 1].
    var tau = 0.0;
    if (params.top_p < 1.0) {
        let target_mass = params.top_p * total;
        var lo = 0.0;
        var hi = 1.0;
        if (mass_above(lid, base, mx, 1.0) >= target_mass) {
            lo = 1.0;
        }
        for (var it = 0u; it < 40u; it++) {
            let mid = 0.5 * (lo + hi);
            if (mass_above(lid, base, mx, mid) >= target_mass) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        tau = lo;
    }
    let kept = mass_above(lid, base, mx, tau);
    let r = pcg(params.seed ^ pcg((params.step * 65599u) ^ pcg(row + 0x9e3779b9u)));
    let u = f32(r >> 8u) / 16777216.0 * kept;
    // Each thread owns a contiguous run of ids; an exclusive scan of the runs' kept mass finds the run holding u.
    let run = (params.vocab + WG - 1u) / WG;
    let start = lid * run;
    let end = min(start + run, params.vocab);
    var own = 0.0;
    for (var i = start; i < end; i++) {
        let p = weight(base, i, mx);
        if (p >= tau) {
            own += p;
        }
    }
    red_s[lid] = own;
    workgroupBarrier();
    if (lid == 0u) {
        var acc = 0.0;
        for (var t = 0u; t < WG; t++) {
            let v = red_s[t];
            red_s[t] = acc;
            acc += v;
        }
    }
    workgroupBarrier();
    let before = red_s[lid];
    // The argmax is always kept, so it is the fallback when rounding leaves u past the last run.
    if (lid == 0u) {
        next_ids[row] = top;
    }
    storageBarrier();
    workgroupBarrier();
    if (u >= before && u < before + own) {
        var acc = before;
        var chosen = 0xffffffffu;
        for (var i = start; i < end; i++) {
            let p = weight(base, i, mx);
            if (p >= tau) {
                acc += p;
                chosen = i;
                if (u < acc) {
                    break;
                }
            }
        }
        if (chosen != 0xffffffffu) {
            next_ids[row] = chosen;
        }
    }
}
