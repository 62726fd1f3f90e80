//! Token choice on the host, for what the GPU's select kernel does not do: Hugging Face's repetition penalty and
//! top-k, and draws that depend on one sequence's own seed rather than on its row in a batch.
//!
//! [`Generator::generate_streaming`](crate::generate::Generator::generate_streaming) reads a step's logits back and
//! calls [`choose`] for each sequence whose [`TokenChoice`] needs the host; every other sequence keeps the GPU's
//! choice. The processing follows transformers' `generate` in its order: repetition penalty
//! (`RepetitionPenaltyLogitsProcessor`), then for sampling temperature, top-k and top-p
//! (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`), then a draw from what is left. The draw uses
//! the GPU sampler's generator (`select.wgsl`): [`draw`] for `(seed, step, 0)` is the number the kernel draws for
//! row 0, and both walk the kept tokens in id order, so a host draw and a GPU draw of the same distribution pick the
//! same token (up to float rounding at a boundary).
//!
//! Cost: the step's logits (`batch x vocab` f32, 200 KB per sequence for OPT's vocabulary) are read back, and each
//! host row is copied and scanned a few times (a partial sort for top-k, a sort of the kept tokens for top-p); rows
//! run in parallel. Greedy sequences without a penalty never need it.

use rayon::prelude::*;

pub use crate::model::Sampling;

/// How one sequence's next token is chosen from its logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenChoice {
    /// Greedy, or a draw with temperature, top-p and a seed. With `choices` in
    /// [`Generator::generate_streaming`](crate::generate::Generator::generate_streaming), a sequence's draws depend
    /// only on its own seed and the step.
    pub sampling: Sampling,
    /// Sampling keeps only the `top_k` most likely tokens (and any tied with the last), as transformers' `top_k`;
    /// 0 keeps all. Greedy ignores it.
    pub top_k: usize,
    /// transformers' `repetition_penalty`: before anything else, every distinct token of the prompt and of the
    /// tokens generated so far has its logit divided by this when positive, multiplied when negative. 1: none.
    pub repetition_penalty: f32,
}

impl TokenChoice {
    /// The most likely token, no penalty.
    pub const GREEDY: TokenChoice = TokenChoice {
        sampling: Sampling::Greedy,
        top_k: 0,
        repetition_penalty: 1.0,
    };

    /// A choice of `sampling` with no top-k and no penalty.
    pub fn new(sampling: Sampling) -> TokenChoice {
        TokenChoice {
            sampling,
            ..TokenChoice::GREEDY
        }
    }

    /// Why these parameters cannot be used, if they cannot: temperature > 0 and finite, top_p in (0, 1], penalty > 0
    /// and finite.
    pub fn check(&self) -> Result<(), String> {
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            ));
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(format!("temperature must be > 0, got {temperature}"));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {top_p}"));
            }
        }
        Ok(())
    }

    /// Whether the GPU's argmax makes this choice (greedy without a penalty); everything else runs on the host.
    pub fn is_plain_greedy(&self) -> bool {
        matches!(self.sampling, Sampling::Greedy) && self.repetition_penalty == 1.0
    }
}

/// The GPU sampler's hash (`pcg` in select.wgsl).
fn pcg(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The uniform number in [0, 1) the GPU sampler draws for `(seed, step, row)`: 24 random bits.
pub fn draw(seed: u64, step: usize, row: u32) -> f64 {
    let seed = (seed ^ (seed >> 32)) as u32;
    let step = step as u32;
    let r = pcg(seed ^ pcg(step.wrapping_mul(65_599) ^ pcg(row.wrapping_add(0x9e37_79b9))));
    f64::from(r >> 8) / 16_777_216.0
}

/// transformers' repetition penalty, in place: each id of `seen` (distinct) has its logit divided by `penalty` when
/// positive, multiplied when negative. Ids outside `logits` are ignored.
pub fn penalize(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The most likely token: the lowest id among equal maxima; NaN never wins (the last id when every logit is NaN, as
/// the GPU's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(logits.len().saturating_sub(1), |(i, _)| i) as u32
}

/// The tokens a draw can pick and their unnormalised probabilities, in id order: softmax(logits / temperature)
/// restricted to the `top_k` most likely (ties with the k-th kept; 0: all), then to the nucleus of mass `top_p`
/// (transformers' rule: a token is kept when the tokens more likely than it hold less than `top_p` of the mass;
/// equal probabilities count in id order). NaN and -inf logits are never kept. Empty only when every logit is.
pub fn candidates(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<(u32, f64)> {
    let valid = logits
        .iter()
        .filter(|v| !v.is_nan() && **v > f32::NEG_INFINITY);
    let Some(max) = valid.clone().copied().reduce(f32::max) else {
        return Vec::new();
    };
    let count = valid.count();
    let threshold = if top_k > 0 && top_k < count {
        let mut values: Vec<f32> = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan() && *v > f32::NEG_INFINITY)
            .collect();
        let (_, kth, _) = values.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
        *kth
    } else {
        f32::NEG_INFINITY
    };
    let t = f64::from(temperature);
    let mut kept: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &v)| !v.is_nan() && v > f32::NEG_INFINITY && v >= threshold)
        .map(|(i, &v)| (i as u32, ((f64::from(v) - f64::from(max)) / t).exp()))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    if top_p < 1.0 && kept.len() > 1 {
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        let mut order: Vec<(u32, f64)> = kept.clone();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let target = f64::from(top_p) * total;
        let mut before = 0.0;
        let mut keep_count = 0;
        for &(_, w) in &order {
            if before >= target {
                break;
            }
            before += w;
            keep_count += 1;
        }
        let mut nucleus: Vec<u32> = order[..keep_count.max(1)]
            .iter()
            .map(|&(id, _)| id)
            .collect();
        nucleus.sort_unstable();
        kept.retain(|(id, _)| nucleus.binary_search(id).is_ok());
    }
    kept
}

/// The token the uniform number `u` in [0, 1) picks from `candidates` (in id order): the first whose cumulative
/// weight exceeds `u` times the total, the most likely one when rounding leaves `u` past the end.
pub fn pick(candidates: &[(u32, f64)], u: f64) -> Option<u32> {
    let total: f64 = candidates.iter().map(|&(_, w)| w).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &(id, w) in candidates {
        acc += w;
        if target < acc {
            return Some(id);
        }
    }
    candidates
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|&(id, _)| id)
}

/// One sequence's token at `step`: `logits` (its row, modified in place by the penalty) processed as `choice` says,
/// `seen` the distinct ids of its prompt and generated tokens so far, the draw keyed by the choice's seed, `step`
/// and row 0.
pub fn choose(logits: &mut [f32], choice: &TokenChoice, seen: &[u32], step: usize) -> u32 {
    penalize(logits, seen, choice.repetition_penalty);
    match choice.sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample {
            temperature,
            top_p,
            seed,
        } => {
            let kept = candidates(logits, temperature, choice.top_k, top_p);
            pick(&kept, draw(seed, step, 0)).unwrap_or_else(|| argmax(logits))
        }
    }
}

/// [`choose`] for the rows of `logits` (`[rows, vocab]`) whose entry in `rows` is `Some((choice, seen))`, in
/// parallel; `None` rows are skipped (their result is `None`).
pub fn choose_rows(
    logits: &[f32],
    vocab: usize,
    rows: &[Option<(&TokenChoice, &[u32])>],
    step: usize,
) -> Vec<Option<u32>> {
    rows.par_iter()
        .enumerate()
        .map(|(r, row)| {
            let (choice, seen) = (*row)?;
            let mut own = logits.get(r * vocab..(r + 1) * vocab)?.to_vec();
            Some(choose(&mut own, choice, seen, step))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of logits with some ties.
    fn logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((pcg(i ^ salt) % 2000) as f32 / 100.0) - 10.0)
            .collect()
    }

    #[test]
    fn top_k_keeps_exactly_the_k_largest_and_their_ties() {
        let mut l = vec![1.0, 5.0, 3.0, 5.0, 2.0, 3.0, -1.0];
        let ids =
            |l: &[f32], k| -> Vec<u32> { candidates(l, 1.0, k, 1.0).iter().map(|c| c.0).collect() };
        assert_eq!(ids(&l, 1), vec![1, 3]); // tied for first
        assert_eq!(ids(&l, 2), vec![1, 3]);
        assert_eq!(ids(&l, 3), vec![1, 2, 3, 5]); // the third largest value (3.0) is tied
        assert_eq!(ids(&l, 0), (0..7).collect::<Vec<_>>());
        assert_eq!(ids(&l, 100), (0..7).collect::<Vec<_>>());
        l[1] = f32::NAN;
        l[6] = f32::NEG_INFINITY;
        assert_eq!(ids(&l, 1), vec![3]);
        assert_eq!(ids(&l, 0), vec![0, 2, 3, 4, 5]);
    }

    /// transformers' TopPLogitsWarper, written as it is: sort ascending, cumulative softmax, drop tokens whose
    /// cumulative probability is <= 1 - top_p, keep at least the last.
    fn hf_top_p(logits: &[f32], top_p: f64) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let w: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Ascending; among equal probabilities the higher id first, so that descending order is id order.
        order.sort_by(|&a, &b| w[a].total_cmp(&w[b]).then(b.cmp(&a)));
        let mut cum = 0.0;
        let mut kept = Vec::new();
        for (rank, &i) in order.iter().enumerate() {
            cum += w[i] / total;
            if cum > 1.0 - top_p || rank == order.len() - 1 {
                kept.push(i as u32);
            }
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn top_p_matches_transformers_rule() {
        for salt in 0..40 {
            let l = logits(50, salt);
            for top_p in [0.05f32, 0.3, 0.5, 0.9, 0.999] {
                let got: Vec<u32> = candidates(&l, 1.0, 0, top_p).iter().map(|c| c.0).collect();
                assert_eq!(got, hf_top_p(&l, top_p as f64), "salt {salt} top_p {top_p}");
            }
        }
    }

    #[test]
    fn a_draw_follows_the_kept_distribution_exactly() {
        // Sweeping u over [0, 1) picks each kept token for a share of u equal to its probability.
        // Logits within [-1, 1], so that top-k and top-p both leave several candidates to draw among.
        let l: Vec<f32> = logits(40, 7).iter().map(|v| v / 10.0).collect();
        let kept = candidates(&l, 0.7, 12, 0.8);
        assert!(kept.len() > 2, "{} candidates", kept.len());
        let total: f64 = kept.iter().map(|c| c.1).sum();
        let steps = 200_000;
        let mut hits = std::collections::BTreeMap::new();
        for s in 0..steps {
            let u = (s as f64 + 0.5) / steps as f64;
            *hits.entry(pick(&kept, u).unwrap()).or_insert(0usize) += 1;
        }
        assert_eq!(hits.len(), kept.len());
        for &(id, w) in &kept {
            let share = hits[&id] as f64 / steps as f64;
            assert!(
                (share - w / total).abs() <= 1.0 / steps as f64,
                "token {id}"
            );
        }
        // Temperature scales log-probabilities: weight ratios are exp((a - b) / T).
        let (a, b) = (kept[0], kept[1]);
        let want = ((l[a.0 as usize] as f64 - l[b.0 as usize] as f64) / 0.7f32 as f64).exp();
        assert!((a.1 / b.1 - want).abs() < 1e-9 * want);
    }

    #[test]
    fn repetition_penalty_is_transformers_formula() {
        let mut l = vec![2.0, -2.0, 0.0, 4.0];
        penalize(&mut l, &[0, 1, 2], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 0.0, 4.0]);
        let mut l = vec![3.0, 2.9];
        // Greedy picks token 1 once token 0 (already seen) is penalised.
        let choice = TokenChoice {
            repetition_penalty: 1.5,
            ..TokenChoice::GREEDY
        };
        assert_eq!(choose(&mut l, &choice, &[0], 0), 1);
    }

    #[test]
    fn argmax_takes_the_lowest_id_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 1);
    }

    #[test]
    fn draws_are_uniform_and_keyed() {
        let n = 20_000;
        let mean = (0..n).map(|s| draw(42, s, 0)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_ne!(draw(1, 0, 0), draw(2, 0, 0));
        assert_ne!(draw(1, 0, 0), draw(1, 1, 0));
        assert_ne!(draw(1, 0, 0), draw(1, 0, 1));
        assert!((0..1000).all(|s| (0.0..1.0).contains(&draw(s, s as usize, 3))));
    }
}
