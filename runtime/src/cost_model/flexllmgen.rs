//! FlexLLMGen's formulation, term for term as COST-MODEL.md writes it out: a model of FlexLLMGen's PyTorch runtime
//! (three CUDA streams, so every transfer direction overlaps compute), with its memory estimates.

use super::lp::{coef, Lp, CAP, NV, TGEN, TPRE};
use super::{CapMode, Problem, CC, CG, CN, HC, HG, HN, WC, WG, WN};
use crate::hardware::Rates;

const GIB: f64 = (1u64 << 30) as f64;

/// Builds the linear program for one `(gbs, bls)`.
pub(crate) fn build(p: &Problem, gbs: usize, bls: usize, caps: CapMode) -> Lp {
    let c = p.config;
    let hw = p.hardware;
    let s = p.workload.prompt_len as f64;
    let n = p.workload.gen_len as f64;
    let l = c.num_hidden_layers as f64;
    let h1 = c.hidden_size as f64;
    let h2 = c.ffn_embed_dim as f64;
    let nh = c.n_head as f64;
    let g = gbs as f64;
    let b = bls as f64;
    let Rates {
        ctog,
        gtoc_cache,
        gtoc_hidden,
        dtoc,
        ctod_cache_p,
        ctod_hidden_p,
        ctod_g,
        mm_p,
        mm_g,
        bmm_p,
        bmm_g,
    } = hw.rates();
    let cpu_real = hw.cpu_rate(gbs, c.hidden_size);

    let mut wi = 8.0 * h1 * h1 + 4.0 * h1 * h2;
    if p.compress_weight {
        wi /= 4.0;
    }

    let mut lp = Lp::default();
    lp.objective[TPRE] = l / b;
    lp.objective[TGEN] = (n - 1.0) * l / b;

    lp.eq(coef(&[(WG, 1.0), (WC, 1.0), (WN, 1.0)]), 1.0);
    lp.eq(coef(&[(CG, 1.0), (CC, 1.0), (CN, 1.0)]), 1.0);
    lp.eq(coef(&[(HG, 1.0), (HC, 1.0), (HN, 1.0)]), 1.0);
    lp.eq(coef(&[(HG, 1.0), (HC, 1.0)]), 1.0);

    // Prefill, per layer. Each term is a list of (variable, seconds per unit).
    let hid_p = 2.0 * s * h1 * b;
    let ctog_p = [
        (WC, wi / ctog),
        (WN, wi / ctog),
        (HC, hid_p / ctog),
        (HN, hid_p / ctog),
    ];
    let cache_p = 4.0 * (s + 1.0) * h1 * b;
    let gtoc_p = [
        (CC, cache_p / gtoc_cache),
        (CN, cache_p / gtoc_cache),
        (HC, hid_p / gtoc_hidden),
        (HN, hid_p / gtoc_hidden),
    ];
    let dtoc_p = [(WN, wi / dtoc), (HN, hid_p / dtoc)];
    let ctod_p = [(CN, cache_p / ctod_cache_p), (HN, hid_p / ctod_hidden_p)];
    let comp_p = b * (8.0 * s * h1 * h1 + 4.0 * s * h1 * h2) / mm_p + 4.0 * b * s * s * h1 / bmm_p;
    lp.le(sum_minus(&[&ctog_p, &dtoc_p], TPRE), 0.0);
    lp.le(sum_minus(&[&gtoc_p, &ctod_p], TPRE), 0.0);
    lp.le(coef(&[(TPRE, -1.0)]), -comp_p);

    // Decode, per layer and token.
    let hid_g = 2.0 * h1 * b;
    let ctx = 4.0 * b * (s + n / 2.0) * h1;
    let ctog_gv = [
        (WC, wi / ctog),
        (WN, wi / ctog),
        (HC, hid_g / ctog),
        (HN, hid_g / ctog),
    ];
    let gtoc_gv = [(HC, hid_g / gtoc_hidden), (HN, hid_g / gtoc_hidden)];
    let dtoc_gv = [
        (CN, ctx / dtoc),
        (HN, hid_g / dtoc),
        (WN, wi / (0.95 * dtoc)),
    ];
    let ctod_gv = [(CN, 4.0 * b * h1 / ctod_g), (HN, hid_g / ctod_g)];
    let comp_g_const = b * (8.0 * h1 * h1 + 4.0 * h1 * h2) / mm_g;
    let comp_gv = [
        (CG, ctx / bmm_g),
        (CC, ctx / cpu_real),
        (CN, ctx / cpu_real),
    ];
    for x in [&gtoc_gv[..], &dtoc_gv[..], &ctod_gv[..]] {
        lp.le(sum_minus(&[&ctog_gv, x], TGEN), 0.0);
    }
    lp.le(sum_minus(&[&ctog_gv, &comp_gv], TGEN), -comp_g_const);

    // Memory rows, in GiB: (coefficients, constant) with constant + coef . x <= alpha * capacity.
    let a = p.headroom;
    let sn = s + n;
    let inter_p = 8.0 * g * s * h1
        + g * (2.0 * s * h1 + 2.0 * nh * s * s)
        + g * 2.0 * s * h1
        + 4.0 * g * s * h1
        + 2.0 * g * s * h2
        + 2.0 * g * s * h1;
    // GPU prefill: home_p + work_p, with work_p's (1 - wg) and (1 - hg) expanded.
    let gpu_p = (
        coef(&[
            (WG, wi * l - 2.0 * wi),
            (HG, 2.0 * s * h1 * b - 2.0 * s * h1 * g),
            (CG, 4.0 * sn * h1 * b * l),
        ]),
        2.0 * wi + 2.0 * s * h1 * g + inter_p,
    );
    let inter_g_const = 8.0 * g * h1 + 4.0 * g * h1 + 2.0 * g * h2 + 2.0 * g * h1;
    let inter_g_cg =
        g * (2.0 * h1 + 2.0 * sn * h1 + 2.0 * nh * sn) + g * (2.0 * sn * h1 + 2.0 * h1);
    let gpu_g = (
        coef(&[
            (WG, wi * l - 2.0 * wi),
            (HG, 2.0 * h1 * b - 2.0 * h1 * g),
            (CG, 4.0 * sn * h1 * b * l + 4.0 * g * sn * h1 + inter_g_cg),
        ]),
        2.0 * wi + 2.0 * h1 * g + inter_g_const,
    );
    let cpu_p = (
        coef(&[
            (WC, wi * l),
            (HC, 2.0 * s * h1 * b),
            (CC, 4.0 * s * h1 * b * l),
            (WG, -wi),
            (HG, -2.0 * s * h1 * g),
        ]),
        wi + 2.0 * s * h1 * g,
    );
    let cpu_g = (
        coef(&[
            (WC, wi * l),
            (HC, 2.0 * h1 * b),
            (CC, 4.0 * sn * h1 * b * l),
            (WN, wi),
            (HN, 4.0 * h1 * g),
            (CN, 8.0 * sn * h1 * g),
        ]),
        2.0 * nh * sn * g + 2.0 * h1 * g,
    );
    let disk = (
        coef(&[
            (WN, wi * l),
            (HN, 2.0 * s * h1 * b),
            (CN, 4.0 * sn * h1 * b * l),
        ]),
        0.0,
    );
    for (tier, (row, constant)) in [(0, gpu_p), (0, gpu_g), (1, cpu_p), (1, cpu_g), (2, disk)] {
        add_memory_row(&mut lp, tier, row, constant, a, caps);
    }
    if caps.minimise.is_some() {
        lp.objective = coef(&[(CAP, 1.0)]);
    }
    lp
}

/// Adds `constant + row . x <= alpha * cap(tier)` in GiB, with the cap a variable when it is the one minimised.
pub(crate) fn add_memory_row(
    lp: &mut Lp,
    tier: usize,
    row: [f64; NV],
    constant: f64,
    alpha: f64,
    caps: CapMode,
) {
    let mut r = row.map(|v| v / GIB);
    let constant = constant / GIB;
    if caps.minimise == Some(tier) {
        r[CAP] = -alpha;
        lp.le(r, -constant);
    } else if caps.caps[tier].is_finite() {
        lp.le(r, alpha * caps.caps[tier] / GIB - constant);
    }
}

/// Sum of the terms minus the variable `t`.
fn sum_minus(terms: &[&[(usize, f64)]], t: usize) -> [f64; NV] {
    let mut c = [0.0; NV];
    for list in terms {
        for &(i, v) in *list {
            c[i] += v;
        }
    }
    c[t] -= 1.0;
    c
}
