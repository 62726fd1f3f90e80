//! Choosing a policy: a linear program per `(gpu_batch_size, num_gpu_batches)` over the nine placement fractions,
//! minimising time per generated token, and a search over batch sizes.
//!
//! Two formulations ([`CostModelKind`]): FlexLLMGen's, term for term (a model of FlexLLMGen's runtime, for
//! comparison and validation), and strata's own (a model of strata's runtime: one GPU queue, split activations,
//! real compression ratios, memory from the [`crate::offload::placement`]). Two searches ([`SearchKind`]): FlexLLMGen's
//! exactly, and an improved one that evaluates a superset of its points (more batch sizes, a wider scan of
//! `num_gpu_batches`), so its optimum is never worse on the same formulation.

pub mod auto;
mod flexllmgen;
mod lp;
mod split;
mod strata;

pub use split::{time_split, Lane, TimeSplit, COMPUTE, FRACTION_NAMES};

use std::collections::HashMap;
use std::fmt;

use crate::config::OptConfig;
use crate::hardware::HardwareProfile;
use crate::offload::placement::{
    plan, CapError, Caps, DeviceLimits, MemoryPlan, Placement, PlacementError, WeightSummary,
    Workload,
};
use crate::offload::policy::{
    format_bytes, CompressionConfig, Percent, Policy, TierSplit, Transfer,
};
use crate::tiers::Tier;

use lp::{TGEN, TPRE};

// Indices of the placement fractions in the linear programs.
pub(crate) const WG: usize = 0;
pub(crate) const WC: usize = 1;
pub(crate) const WN: usize = 2;
pub(crate) const CG: usize = 3;
pub(crate) const CC: usize = 4;
pub(crate) const CN: usize = 5;
pub(crate) const HG: usize = 6;
pub(crate) const HC: usize = 7;
pub(crate) const HN: usize = 8;

/// Largest GPU batch size and number of GPU batches a search considers (a guard, far above any real optimum).
const MAX_GBS: usize = 1 << 14;
const MAX_NGB: usize = 1 << 16;

/// The default bound on sequences per block ([`Problem::max_block`]).
pub const DEFAULT_MAX_BLOCK: usize = 1024;

/// Capacities the memory rows use (bytes, infinite when uncapped) and which tier's capacity, if any, is a free
/// variable being minimised.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CapMode {
    pub caps: [f64; 3],
    pub minimise: Option<usize>,
}

/// Which formulation describes the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CostModelKind {
    /// strata's runtime (the default).
    #[default]
    Strata,
    /// FlexLLMGen's runtime, as in its experimental/cost_model.py.
    FlexLlmGen,
}

impl CostModelKind {
    /// `strata` or `flexllmgen`.
    pub fn parse(name: &str) -> Option<CostModelKind> {
        match name.to_ascii_lowercase().as_str() {
            "strata" => Some(CostModelKind::Strata),
            "flexllmgen" | "flexgen" => Some(CostModelKind::FlexLlmGen),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub const fn as_str(self) -> &'static str {
        match self {
            CostModelKind::Strata => "strata",
            CostModelKind::FlexLlmGen => "flexllmgen",
        }
    }
}

impl fmt::Display for CostModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which search over batch sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SearchKind {
    /// FlexLLMGen's: gbs 1, 2, 3, 4, 8, 16, ...; per gbs the largest feasible num_gpu_batches by doubling and
    /// bisection, then num_gpu_batches 1, 2, ... while the optimum improves; stop at the first infeasible gbs.
    FlexLlmGen,
    /// FlexLLMGen's points plus every gbs up to 16 and a 1.25x geometric grid beyond, a geometric grid of
    /// num_gpu_batches up to the largest feasible with a local refinement around the best.
    #[default]
    Improved,
}

/// One policy search: the model, the workload, the machine, the memory budget and the options.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    /// The model.
    pub config: &'a OptConfig,
    /// Prompt and generation lengths.
    pub workload: Workload,
    /// The machine's speeds.
    pub hardware: &'a HardwareProfile,
    /// Capacity per tier in bytes; `None` is unlimited.
    pub caps: Caps,
    /// Fraction of each capacity the plan may use (FlexLLMGen: 0.8).
    pub headroom: f64,
    /// Quantise weights.
    pub compress_weight: bool,
    /// Quantisation of weights (strata's formulation; FlexLLMGen's divides weight bytes by 4).
    pub compress_weight_config: CompressionConfig,
    /// Quantise the KV cache (strata's formulation only; FlexLLMGen's has no cache compression term).
    pub compress_cache: bool,
    /// Quantisation of the KV cache.
    pub compress_cache_config: CompressionConfig,
    /// How CPU-resident weights reach the decode kernels (strata's formulation; FlexLLMGen's always copies).
    pub transfer: Transfer,
    /// Which formulation.
    pub kind: CostModelKind,
    /// Most sequences in one block (`gpu_batch_size * num_gpu_batches`): the number of prompts a run has. Larger
    /// blocks amortise weight transfers further, so without a bound an uncapped tier lets the search grow the block
    /// without end.
    pub max_block: usize,
}

impl<'a> Problem<'a> {
    /// A problem with FlexLLMGen's defaults: headroom 0.8, no compression, strata's formulation.
    pub fn new(
        config: &'a OptConfig,
        workload: Workload,
        hardware: &'a HardwareProfile,
        caps: Caps,
    ) -> Self {
        Problem {
            config,
            workload,
            hardware,
            caps,
            headroom: 0.8,
            compress_weight: false,
            compress_weight_config: CompressionConfig::DEFAULT,
            compress_cache: false,
            compress_cache_config: CompressionConfig::DEFAULT,
            transfer: Transfer::Auto,
            kind: CostModelKind::Strata,
            max_block: DEFAULT_MAX_BLOCK,
        }
    }

    fn cap_array(&self) -> [f64; 3] {
        Tier::ALL.map(|t| self.caps.get(t).map_or(f64::INFINITY, |b| b as f64))
    }
}

/// The optimum of one linear program.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Sequences per GPU batch.
    pub gpu_batch_size: usize,
    /// GPU batches per block.
    pub num_gpu_batches: usize,
    /// Whether decode attention over off-GPU cache runs on the CPU.
    pub cpu_cache_compute: bool,
    /// Whether it was priced with block decode steps ([`crate::offload::placement::block_decode`]).
    pub block_decode: bool,
    /// How CPU-resident weights reach the decode kernels: the problem's setting, or with `Transfer::Auto` the path
    /// the search priced fastest for the chosen batch sizes ([`search`]).
    pub transfer: Transfer,
    /// `[wg, wc, wn, cg, cc, cn, hg, hc, hn]`.
    pub fractions: [f64; 9],
    /// Predicted prefill time of one layer, seconds.
    pub prefill_layer_s: f64,
    /// Predicted decode time of one layer for one token, seconds.
    pub decode_layer_s: f64,
    /// Seconds per generated token of the block, the objective: `(Tpre*l + Tgen*(n-1)*l) / bls`.
    pub objective: f64,
}

impl Candidate {
    /// Effective batch.
    pub fn block_size(&self) -> usize {
        self.gpu_batch_size * self.num_gpu_batches
    }
}

/// The chosen policy with its predictions and memory plan.
#[derive(Clone, Debug)]
pub struct Choice {
    /// The formulation that chose it.
    pub kind: CostModelKind,
    /// The winning linear program's optimum.
    pub candidate: Candidate,
    /// The policy to run (offload_dir unset: the caller supplies it).
    pub policy: Policy,
    /// Predicted prefill time of the whole block, seconds.
    pub prefill_s: f64,
    /// Predicted decode time of the whole block, seconds.
    pub decode_s: f64,
    /// Prompt tokens per second during prefill.
    pub prefill_throughput: f64,
    /// Generated tokens per second during decode (0 when only one token is generated).
    pub decode_throughput: f64,
    /// Generated tokens per second overall: `bls * gen_len / (prefill + decode)`.
    pub total_throughput: f64,
    /// strata's memory plan for the policy.
    pub plan: MemoryPlan,
    /// Whether the plan fits the caps (FlexLLMGen's formulation estimates memory its own way, so it may not).
    pub plan_check: Result<(), CapError>,
    /// Linear programs solved by the search.
    pub lp_solves: usize,
}

/// Why no policy could be chosen.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CostModelError {
    /// The workload or model cannot be planned at all.
    #[error(transparent)]
    Plan(#[from] PlacementError),
    /// A headroom outside (0, 1].
    #[error("--headroom must be in (0, 1], found {0}")]
    Headroom(f64),
    /// The formulation cannot evaluate the given policy.
    #[error("{0}")]
    Unsupported(String),
    /// A zero bound on the block.
    #[error("--max-batch must be at least 1")]
    MaxBlock,
    /// Nothing fits, even one sequence.
    #[error("{model} does not fit {caps} (using {headroom_pct}% of each) even with one sequence: {advice}")]
    Infeasible {
        /// The model's name.
        model: String,
        /// The caps as flags.
        caps: String,
        /// Headroom in percent.
        headroom_pct: f64,
        /// The smallest capacities that would do.
        advice: String,
        /// Per tier, the smallest capacity (bytes) that makes one sequence fit with the other caps unchanged.
        needed: Vec<(Tier, u64)>,
    },
}

/// Solves linear programs with memoisation and counts them.
struct Evaluator<'a> {
    p: Problem<'a>,
    weights: WeightSummary,
    memo: HashMap<(usize, usize), Option<Candidate>>,
    solves: usize,
}

impl<'a> Evaluator<'a> {
    fn new(p: Problem<'a>) -> Self {
        let skeleton = strata::skeleton(&p, 1, 1, false);
        Evaluator {
            weights: WeightSummary::new(p.config, &skeleton),
            p,
            memo: HashMap::new(),
            solves: 0,
        }
    }

    fn mode(&self) -> CapMode {
        CapMode {
            caps: self.p.cap_array(),
            minimise: None,
        }
    }

    fn eval(&mut self, gbs: usize, ngb: usize) -> Option<Candidate> {
        if let Some(c) = self.memo.get(&(gbs, ngb)) {
            return *c;
        }
        if gbs * ngb > self.p.max_block {
            return None;
        }
        let result = match self.p.kind {
            CostModelKind::FlexLlmGen => {
                self.solves += 1;
                let x = flexllmgen::build(&self.p, gbs, gbs * ngb, self.mode()).solve();
                // FlexLLMGen's decode time charges off-GPU cache to CPU attention: that is cpu_cache_compute.
                x.map(|x| self.candidate(gbs, ngb, x[CC] + x[CN] > 1e-9, x))
            }
            CostModelKind::Strata => {
                let mut best: Option<Candidate> = None;
                for ccc in [false, true] {
                    self.solves += 1;
                    let x =
                        strata::build(&self.p, &self.weights, gbs, ngb, ccc, false, self.mode())
                            .solve();
                    if let Some(x) = x {
                        let c = self.candidate(gbs, ngb, ccc, x);
                        if best.is_none_or(|b| c.objective < b.objective) {
                            best = Some(c);
                        }
                    }
                }
                best
            }
        };
        self.memo.insert((gbs, ngb), result);
        result
    }

    fn candidate(&self, gbs: usize, ngb: usize, ccc: bool, x: [f64; lp::NV]) -> Candidate {
        let l = self.p.config.num_hidden_layers as f64;
        let n = self.p.workload.gen_len as f64;
        let b = (gbs * ngb) as f64;
        let mut fractions = [0.0; 9];
        fractions.copy_from_slice(&x[..9]);
        Candidate {
            gpu_batch_size: gbs,
            num_gpu_batches: ngb,
            cpu_cache_compute: ccc,
            block_decode: false,
            transfer: self.p.transfer,
            fractions,
            prefill_layer_s: x[TPRE],
            decode_layer_s: x[TGEN],
            objective: (x[TPRE] * l + x[TGEN] * (n - 1.0) * l) / b,
        }
    }

    fn feasible(&mut self, gbs: usize, ngb: usize) -> bool {
        self.eval(gbs, ngb).is_some()
    }

    /// The largest feasible num_gpu_batches for `gbs` (assuming feasibility at 1), by doubling then bisection.
    fn max_feasible_ngb(&mut self, gbs: usize) -> usize {
        let mut lo = 1;
        while lo * 2 <= MAX_NGB && self.feasible(gbs, lo * 2) {
            lo *= 2;
        }
        let mut hi = lo * 2; // infeasible (or past the guard)
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.feasible(gbs, mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

fn better(a: Option<Candidate>, b: Candidate) -> Option<Candidate> {
    match a {
        Some(a) if a.objective <= b.objective => Some(a),
        _ => Some(b),
    }
}

/// FlexLLMGen's gbs sequence: 1, 2, 3, 4, 8, 16, ...
fn flexllmgen_gbs() -> impl Iterator<Item = usize> {
    [1, 2, 3]
        .into_iter()
        .chain((2..).map(|k| 1usize << k))
        .take_while(|&g| g <= MAX_GBS)
}

fn search_flexllmgen(ev: &mut Evaluator) -> Option<Candidate> {
    let mut best = None;
    for gbs in flexllmgen_gbs() {
        if !ev.feasible(gbs, 1) {
            break;
        }
        let max = ev.max_feasible_ngb(gbs);
        let mut prev = f64::INFINITY;
        for ngb in 1..=max {
            let Some(c) = ev.eval(gbs, ngb) else { break };
            if c.objective < prev {
                prev = c.objective;
                best = better(best, c);
            } else {
                break;
            }
        }
    }
    best
}

fn search_improved(ev: &mut Evaluator) -> Option<Candidate> {
    // Every point FlexLLMGen's search evaluates is evaluated here too, so the optimum is at least as good.
    let mut best = search_flexllmgen(ev);
    let mut gbs_list: Vec<usize> = (1..=16).collect();
    let mut g = 16.0f64;
    while (g as usize) < MAX_GBS {
        g *= 1.25;
        gbs_list.push(g.round() as usize);
    }
    gbs_list.extend(flexllmgen_gbs());
    gbs_list.sort_unstable();
    gbs_list.dedup();
    for gbs in gbs_list {
        if !ev.feasible(gbs, 1) {
            break;
        }
        let max = ev.max_feasible_ngb(gbs);
        // A geometric grid 1, 2, 3, 4, 6, 8, 12, 16, ... and the maximum.
        let mut grid: Vec<usize> = (0..)
            .flat_map(|k| [1usize << k, 3usize << k >> 1])
            .take_while(|&v| v <= max)
            .filter(|&v| v >= 1)
            .collect();
        grid.push(max);
        grid.sort_unstable();
        grid.dedup();
        let mut local: Option<Candidate> = None;
        for &ngb in &grid {
            if let Some(c) = ev.eval(gbs, ngb) {
                local = better(local, c);
            }
        }
        let Some(mut at) = local else { continue };
        // Refine around the grid's best by integer hill climbing with a halving step.
        let mut step = (at.num_gpu_batches / 2).max(1);
        loop {
            let mut moved = false;
            for ngb in [
                at.num_gpu_batches.saturating_sub(step),
                at.num_gpu_batches + step,
            ] {
                if ngb == 0 || ngb > max || ngb == at.num_gpu_batches {
                    continue;
                }
                if let Some(c) = ev.eval(gbs, ngb) {
                    if c.objective < at.objective {
                        at = c;
                        moved = true;
                    }
                }
            }
            if !moved {
                if step == 1 {
                    break;
                }
                step /= 2;
            }
        }
        best = better(best, at);
    }
    best
}

/// `--transfer auto` under `--policy auto`: prices the chosen batch sizes with each decode path (copying CPU weights
/// into weight slots; zero-copy per GPU batch; with several GPU batches, block decode steps, which keep caches and
/// hidden rows on the GPU) at the profile's measured rates (`ctog`, `ctog_zero_copy`) and keeps the fastest, so the
/// policy names the path it was priced with. Ties go to the copy path, then to block decode; with no weight in CPU
/// memory the setting stays `auto`.
fn choose_transfer(ev: &mut Evaluator, best: Candidate) -> Candidate {
    if best.fractions[WC] <= 1e-9 {
        // No weight in CPU memory: no path to choose.
        return best;
    }
    let (gbs, ngb) = (best.gpu_batch_size, best.num_gpu_batches);
    // In order of preference on a tie: copies, then block decode (each weight byte once), then zero-copy per batch.
    let mut paths = vec![(Transfer::Copy, false)];
    if ngb > 1 && !ev.p.compress_cache {
        paths.push((Transfer::ZeroCopy, true));
    }
    paths.push((Transfer::ZeroCopy, false));
    let mut chosen: Option<Candidate> = None;
    for (transfer, block) in paths {
        let p = Problem { transfer, ..ev.p };
        for ccc in [false, true] {
            if ccc && block {
                continue;
            }
            ev.solves += 1;
            let lp = strata::build(&p, &ev.weights, gbs, ngb, ccc, block, ev.mode());
            if let Some(x) = lp.solve() {
                let c = Candidate {
                    transfer,
                    block_decode: block,
                    ..ev.candidate(gbs, ngb, ccc, x)
                };
                if chosen.is_none_or(|b| c.objective < b.objective * (1.0 - 1e-9)) {
                    chosen = Some(c);
                }
            }
        }
    }
    chosen.unwrap_or(best)
}

/// Rounds a fraction to a percent with two decimals.
fn pct(x: f64) -> f64 {
    (x.clamp(0.0, 1.0) * 10_000.0).round() / 100.0
}

fn split(gpu: f64, cpu: f64) -> TierSplit {
    let gpu = pct(gpu);
    TierSplit {
        gpu,
        cpu: pct(cpu).min(100.0 - gpu),
    }
}

/// Searches for the best policy.
pub fn search(problem: Problem, search: SearchKind) -> Result<Choice, CostModelError> {
    if !(problem.headroom > 0.0 && problem.headroom <= 1.0) {
        return Err(CostModelError::Headroom(problem.headroom));
    }
    if problem.max_block == 0 {
        return Err(CostModelError::MaxBlock);
    }
    // Validates the model and the workload once, with a trivial policy.
    plan(problem.config, &Policy::default(), problem.workload)?;
    let mut ev = Evaluator::new(problem);
    let best = match search {
        SearchKind::FlexLlmGen => search_flexllmgen(&mut ev),
        SearchKind::Improved => search_improved(&mut ev),
    };
    let Some(mut best) = best else {
        return Err(infeasible(&mut ev));
    };
    if problem.kind == CostModelKind::Strata && problem.transfer == Transfer::Auto {
        best = choose_transfer(&mut ev, best);
    }

    // strata's LP uses the planner's continuous form; the runtime rounds to whole tensors and sequences. If the
    // rounded plan goes over a cap, solve the same batch sizes again with the LP's capacity shrunk by the excess.
    let caps_bytes = problem.caps;
    let mut choice = finish(&ev, best, None)?;
    if problem.kind == CostModelKind::Strata {
        let mut shrink = [0.0f64; 3];
        for _ in 0..4 {
            let Err(over) = &choice.plan_check else { break };
            for o in &over.0 {
                let i = Tier::ALL.iter().position(|t| *t == o.tier).unwrap_or(0);
                shrink[i] += (o.needed - o.cap) as f64 * 1.05 / problem.headroom;
            }
            let mut caps = problem.cap_array();
            for (c, s) in caps.iter_mut().zip(shrink) {
                *c -= s;
            }
            let mode = CapMode {
                caps,
                minimise: None,
            };
            ev.solves += 2;
            // The same transfer path (and block decode) as chosen.
            let p = Problem {
                transfer: best.transfer,
                ..problem
            };
            let retry = [false, true]
                .into_iter()
                .filter(|&ccc| !(ccc && best.block_decode))
                .filter_map(|ccc| {
                    strata::build(
                        &p,
                        &ev.weights,
                        best.gpu_batch_size,
                        best.num_gpu_batches,
                        ccc,
                        best.block_decode,
                        mode,
                    )
                    .solve()
                    .map(|x| Candidate {
                        transfer: best.transfer,
                        block_decode: best.block_decode,
                        ..ev.candidate(best.gpu_batch_size, best.num_gpu_batches, ccc, x)
                    })
                })
                .min_by(|a, b| a.objective.total_cmp(&b.objective));
            let Some(r) = retry else { break };
            best = r;
            choice = finish(&ev, best, None)?;
        }
    }
    debug_assert_eq!(Caps::of(&choice.policy), caps_bytes);
    Ok(choice)
}

/// Predicts the throughput of a given policy (its batch sizes, percents, cpu_cache_compute and compression) under
/// the problem's formulation, with its memory plan checked against the problem's caps. Memory does not constrain
/// the prediction: an over-cap plan is reported in [`Choice::plan_check`].
pub fn evaluate(problem: Problem, policy: &Policy) -> Result<Choice, CostModelError> {
    policy.validate_placement().map_err(PlacementError::from)?;
    let placement = Placement::new(
        problem.config,
        policy,
        problem.workload,
        &DeviceLimits::UNBOUNDED,
    )?;
    let mut problem = problem;
    problem.compress_weight = policy.compress_weight;
    problem.compress_weight_config = policy.compress_weight_config;
    problem.compress_cache = policy.compress_cache;
    problem.compress_cache_config = policy.compress_cache_config;
    problem.transfer = policy.transfer;
    problem.max_block = usize::MAX;
    let mut ev = Evaluator::new(problem);
    let pc = &policy.percent;
    let f = [
        pc.weights.gpu,
        pc.weights.cpu,
        pc.weights.disk(),
        pc.cache.gpu,
        pc.cache.cpu,
        pc.cache.disk(),
        pc.act.gpu,
        pc.act.cpu,
        pc.act.disk(),
    ]
    .map(|v| v / 100.0);
    let free = CapMode {
        caps: [f64::INFINITY; 3],
        minimise: None,
    };
    let (gbs, ngb) = (policy.gpu_batch_size, policy.num_gpu_batches);
    let mut lp = match problem.kind {
        CostModelKind::FlexLlmGen => flexllmgen::build(&problem, gbs, gbs * ngb, free),
        CostModelKind::Strata => strata::build(
            &problem,
            &ev.weights,
            gbs,
            ngb,
            policy.cpu_cache_compute,
            placement.block_decode,
            free,
        ),
    };
    for (i, v) in f.iter().enumerate() {
        lp.eq(lp::coef(&[(i, 1.0)]), *v);
    }
    ev.solves += 1;
    let Some(x) = lp.solve() else {
        return Err(CostModelError::Unsupported(format!(
            "the {} formulation cannot describe this placement (FlexLLMGen's keeps activations off disk)",
            problem.kind
        )));
    };
    let ccc = match problem.kind {
        CostModelKind::FlexLlmGen => x[CC] + x[CN] > 1e-9,
        CostModelKind::Strata => policy.cpu_cache_compute,
    };
    let c = Candidate {
        block_decode: placement.block_decode,
        ..ev.candidate(gbs, ngb, ccc, x)
    };
    finish(&ev, c, Some(policy.clone()))
}

fn finish(ev: &Evaluator, c: Candidate, given: Option<Policy>) -> Result<Choice, CostModelError> {
    let p = &ev.p;
    let f = c.fractions;
    let policy = given.unwrap_or_else(|| Policy {
        gpu_batch_size: c.gpu_batch_size,
        num_gpu_batches: c.num_gpu_batches,
        percent: Percent {
            weights: split(f[WG], f[WC]),
            cache: split(f[CG], f[CC]),
            act: split(f[HG], f[HC]),
        },
        cpu_cache_compute: c.cpu_cache_compute,
        compress_weight: p.compress_weight,
        compress_weight_config: p.compress_weight_config,
        compress_cache: p.compress_cache,
        compress_cache_config: p.compress_cache_config,
        transfer: c.transfer,
        gpu_mem: p.caps.gpu,
        cpu_mem: p.caps.cpu,
        disk_mem: p.caps.disk,
        ..Policy::default()
    });
    let memory = plan(p.config, &policy, p.workload)?;
    let plan_check = memory.check(&p.caps);
    let l = p.config.num_hidden_layers as f64;
    let n = p.workload.gen_len as f64;
    let s = p.workload.prompt_len as f64;
    let b = c.block_size() as f64;
    let prefill_s = c.prefill_layer_s * l;
    let decode_s = c.decode_layer_s * l * (n - 1.0);
    Ok(Choice {
        kind: p.kind,
        candidate: c,
        policy,
        prefill_s,
        decode_s,
        prefill_throughput: b * s / prefill_s,
        decode_throughput: if decode_s > 0.0 {
            b * (n - 1.0) / decode_s
        } else {
            0.0
        },
        total_throughput: b * n / (prefill_s + decode_s),
        plan: memory,
        plan_check,
        lp_solves: ev.solves,
    })
}

/// Builds the "does not fit" error: for each tier, the smallest capacity that fits one sequence with the other caps
/// unchanged; if no single tier helps, the GPU capacity needed with CPU and disk unlimited.
fn infeasible(ev: &mut Evaluator) -> CostModelError {
    let p = ev.p;
    let min_cap = |ev: &mut Evaluator, tier: usize, caps: [f64; 3]| -> Option<f64> {
        let mode = CapMode {
            caps,
            minimise: Some(tier),
        };
        let variants: &[bool] = match p.kind {
            CostModelKind::FlexLlmGen => &[false],
            CostModelKind::Strata => &[false, true],
        };
        variants
            .iter()
            .filter_map(|&ccc| {
                ev.solves += 1;
                let lp = match p.kind {
                    CostModelKind::FlexLlmGen => flexllmgen::build(&p, 1, 1, mode),
                    CostModelKind::Strata => strata::build(&p, &ev.weights, 1, 1, ccc, false, mode),
                };
                lp.solve().map(|x| x[lp::CAP] * (1u64 << 30) as f64)
            })
            .min_by(f64::total_cmp)
    };
    let caps = p.cap_array();
    let mut needed = Vec::new();
    for (i, tier) in Tier::ALL.iter().enumerate() {
        if let Some(bytes) = min_cap(ev, i, caps) {
            needed.push((*tier, round_up_gib(bytes)));
        }
    }
    let advice = if needed.is_empty() {
        match min_cap(ev, 0, [f64::INFINITY; 3]) {
            Some(bytes) => format!(
                "no single cap is enough: with CPU and disk unlimited the GPU needs at least {} for its working \
                 buffers (--gpu-mem {}); a smaller --prompt-len also helps",
                format_bytes(round_up_gib(bytes)),
                crate::offload::policy::format_bytes_exact(round_up_gib(bytes))
            ),
            None => "no capacity is enough for this workload; lower --prompt-len or --gen-len".into(),
        }
    } else {
        let options: Vec<String> = needed
            .iter()
            .map(|(t, b)| {
                format!(
                    "{} {}",
                    t.cap_flag(),
                    crate::offload::policy::format_bytes_exact(*b)
                )
            })
            .collect();
        format!(
            "it would fit with {} (each alone, the other caps unchanged)",
            options.join(", or with ")
        )
    };
    let cap_text: Vec<String> = Tier::ALL
        .iter()
        .map(|t| match p.caps.get(*t) {
            Some(b) => format!("{} {}", t.cap_flag(), format_bytes(b)),
            None => format!("{} unlimited", t.cap_flag()),
        })
        .collect();
    CostModelError::Infeasible {
        model: p.config.name.to_string(),
        caps: cap_text.join(", "),
        headroom_pct: p.headroom * 100.0,
        advice,
        needed,
    }
}

/// Rounds bytes up to a whole GiB (capacities are given that way).
fn round_up_gib(bytes: f64) -> u64 {
    let gib = 1u64 << 30;
    ((bytes / gib as f64).ceil().max(1.0) as u64) * gib
}

#[cfg(test)]
mod tests;
