//! `generate --pipeline` and `bench --pipeline`: one process per pipeline stage, launched by `mpirun`, each running
//! a contiguous range of decoder layers ([`strata_runtime::pipeline`]) on its own adapter with its own policy; hidden rows
//! and token ids travel over MPI ([`super::pipeline_mpi`], with the `mpi` cargo feature).
//!
//! Without the feature, or without a launcher, `--pipeline` says how to build or launch instead.

use std::time::Instant;

use anyhow::{bail, Context};
use strata::{DType, OptConfig};
use strata_runtime::generate::{GenerateOptions, Generator, Sampling};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::placement::{DeviceLimits, Placement, Workload};
use strata_runtime::offload::policy::Policy;
use strata_runtime::pipeline::{balanced_ranges, StageRange, StageWeights};
use strata_runtime::weights::WeightSource;

use super::checks;
use super::headings;
use super::policy_args::PolicyArgs;
use super::process::outln;
use super::JSON_SCHEMA_VERSION;

/// The pipeline flags `generate` and `bench` share.
#[derive(clap::Args, Clone, Debug)]
pub struct PipelineArgs {
    /// Run as one stage of a pipeline over MPI, one process per stage (GPU): `mpirun -np N strata generate
    /// --pipeline ...`; each rank runs its share of the layers with its own policy (needs the `mpi` build).
    #[arg(long, help_heading = headings::POLICY)]
    pub pipeline: bool,
    /// With --pipeline: seconds a stage waits for its neighbour's hidden rows or ids before ending the whole run.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, requires = "pipeline",
          help_heading = headings::POLICY)]
    pub pipeline_timeout: u64,
}

/// The command that launches `what` as a pipeline, for messages.
fn launch_hint(what: &str) -> String {
    format!(
        "launch one process per stage with MPI, e.g. `mpirun -np 2 strata {what} --pipeline ...` on one machine, \
         or `mpirun -np 4 --hostfile hosts strata {what} --pipeline ...` across machines"
    )
}

/// This process's place in the pipeline.
pub struct Rank {
    /// This rank.
    pub rank: usize,
    /// Ranks (stages) in the pipeline.
    pub size: usize,
    /// This rank among those on its machine (which adapter it takes).
    pub local_rank: usize,
    #[cfg(feature = "mpi")]
    pub(super) world: super::pipeline_mpi::World,
}

impl Rank {
    /// The layers this rank runs: the model's layers balanced by bytes over the stages (every stage also holds the
    /// embeddings and the head in this version, so equal layer counts balance the bytes).
    pub fn range(&self, config: &OptConfig) -> anyhow::Result<StageRange> {
        let total = config.num_hidden_layers;
        let ranges = balanced_ranges(total, config.layer_bytes(), &vec![0; self.size])
            .with_context(|| {
                format!(
                    "a pipeline of {} stages needs at least as many decoder layers; {} has {total}",
                    self.size, config.name
                )
            })?;
        Ok(StageRange {
            layers: ranges[self.rank].clone(),
            total,
        })
    }

    /// The adapter this rank opens: `--adapter A,B,...` by local rank, one name for every rank, or else the local
    /// rank's adapter by index (`#N`, wrapping around when ranks outnumber adapters).
    pub fn adapter(&self, given: Option<&str>) -> Option<String> {
        match given {
            Some(names) => {
                let names: Vec<&str> = names.split(',').collect();
                Some(names[self.local_rank % names.len()].to_owned())
            }
            None => Some(format!("#{}", self.local_rank)),
        }
    }

    /// Opens this rank's GPU.
    pub fn gpu(&self, given: Option<&str>) -> anyhow::Result<Gpu> {
        Ok(Gpu::new(&GpuOptions {
            adapter: self.adapter(given),
            max_binding_override: None,
        })?)
    }

    /// The last stage prints the output (it has the logits, and every stage has the ids).
    pub fn prints(&self) -> bool {
        self.rank + 1 == self.size
    }
}

/// Runs `f` as this process's stage of a pipeline: joins the MPI world, runs, and on an error prints it naming the
/// rank, removes this rank's offload files and aborts every rank (whose signal handlers remove theirs).
pub fn run(
    what: &str,
    args: &PipelineArgs,
    f: impl FnOnce(&Rank) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    #[cfg(feature = "mpi")]
    {
        super::pipeline_mpi::run(what, args, f)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (args, f);
        bail!(
            "--pipeline needs MPI, and this strata was built without it: install Open MPI (Debian: libopenmpi-dev \
             openmpi-bin libclang-dev), build with `cargo build --release --features mpi`, then {}",
            launch_hint(what)
        )
    }
}

/// The message for a `--pipeline` run without a launcher.
#[cfg(feature = "mpi")]
pub fn no_launcher(what: &str) -> String {
    format!(
        "--pipeline runs one process per stage, started by an MPI launcher: {}",
        launch_hint(what)
    )
}

/// Checks that every rank chose the same batching: the stages exchange each GPU batch's hidden rows.
pub fn same_batching(rank: &Rank, policy: &Policy) -> anyhow::Result<()> {
    #[cfg(feature = "mpi")]
    {
        let all = rank
            .world
            .all_gather([policy.gpu_batch_size as u64, policy.num_gpu_batches as u64]);
        if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| **b != all[0]) {
            bail!(
                "the stages chose different batching (rank 0: {} x {} GPU batches, rank {r}: {} x {}): every stage \
                 must run the same GPU batches; give --gpu-batch-size and --num-gpu-batches",
                all[0][0],
                all[0][1],
                b[0],
                b[1]
            );
        }
    }
    let _ = (rank, policy);
    Ok(())
}

/// Makes `generator` the stage `range` of the pipeline and waits until every stage has loaded its weights.
pub fn join_stage(
    rank: &Rank,
    generator: &mut Generator,
    range: StageRange,
    timeout_s: u64,
) -> anyhow::Result<()> {
    #[cfg(feature = "mpi")]
    {
        generator.set_stage(rank.world.link(range, timeout_s));
        rank.world.loaded()
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (rank, generator, range, timeout_s);
        Ok(())
    }
}

/// What `bench --pipeline` needs from `bench`'s arguments.
pub struct BenchSetup<'a> {
    /// The whole model's weights.
    pub source: Box<dyn WeightSource>,
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per prompt.
    pub gen_len: usize,
    /// The policy flags (each rank plans its own share with them).
    pub policy: &'a PolicyArgs,
    /// `--adapter`.
    pub adapter: Option<&'a str>,
    /// `--dtype`.
    pub dtype: Option<DType>,
    /// `--max-batch` (with `--policy auto`).
    pub max_batch: usize,
    /// `--json`.
    pub json: bool,
    /// Builds the benchmark's prompts: (count, length, vocabulary, BOS).
    pub prompts: fn(usize, usize, usize, u32) -> Vec<Vec<u32>>,
}

/// `bench --pipeline`: FlexLLMGen's workload through the pipeline; the last rank reports each stage's time, the
/// bubble fraction (time a stage waited for its neighbours), the bytes sent between stages and the throughput.
pub fn bench(setup: BenchSetup, args: &PipelineArgs) -> anyhow::Result<()> {
    run("bench", args, |rank| {
        let whole = *setup.source.config();
        let range = rank.range(&whole)?;
        let staged = StageWeights::new(setup.source.as_ref(), range.clone());
        let config = *staged.config();
        let workload = Workload {
            prompt_len: setup.prompt_len,
            gen_len: setup.gen_len,
        };
        let gpu = rank.gpu(setup.adapter)?;
        let policy = match setup.policy.is_auto() {
            true => super::auto::resolve_auto(
                &gpu,
                &config,
                setup.prompt_len,
                setup.gen_len,
                setup.max_batch,
                setup.policy,
            )?,
            false => setup.policy.to_policy()?,
        };
        let policy = Policy {
            weight_dtype: setup.dtype,
            ..policy
        };
        same_batching(rank, &policy)?;
        let placement = Placement::new(&config, &policy, workload, &DeviceLimits::of(&gpu))?;
        placement.check_caps().map_err(|e| anyhow::anyhow!("{e}"))?;
        checks::memory_fits(&gpu, placement.plan().peak(), policy.gpu_mem)?;
        if !setup.json {
            // One write: the launcher interleaves the ranks' stderr at each write.
            let line = format!(
                "strata bench: rank {} of {}: layers {}..{} of {} on {}\n",
                rank.rank,
                rank.size,
                range.layers.start,
                range.layers.end,
                whole.name,
                gpu.describe()
            );
            eprint!("{line}");
        }
        let mut generator = Generator::with_policy(&gpu, &staged, &policy, &|_| {})?;
        join_stage(rank, &mut generator, range.clone(), args.pipeline_timeout)?;
        let batch = policy.effective_batch();
        let prompts = (setup.prompts)(
            batch,
            setup.prompt_len,
            config.vocab_size,
            config.bos_token_id,
        );
        let started = Instant::now();
        let output = generator
            .generate(
                &prompts,
                &GenerateOptions {
                    max_new_tokens: setup.gen_len,
                    sampling: Sampling::Greedy,
                    ignore_eos: true,
                    record_logits: false,
                },
            )
            .context("running the benchmark")?;
        let wall = started.elapsed().as_secs_f64();
        #[cfg(feature = "mpi")]
        let stages = rank.world.gather_stats(wall, &range)?;
        #[cfg(not(feature = "mpi"))]
        let stages: Option<Vec<StageStats>> = None;
        let Some(stages) = stages else {
            return Ok(());
        };
        report(
            &whole,
            &policy,
            &setup,
            &output.step_seconds,
            batch,
            wall,
            &stages,
        )
    })
}

/// One stage's figures of a pipeline benchmark.
#[derive(Clone, Debug, Default)]
pub struct StageStats {
    /// The model's layers it ran.
    pub layers: (usize, usize),
    /// Wall-clock seconds of its generation.
    pub wall_s: f64,
    /// Seconds it waited for hidden rows or ids from other stages.
    pub wait_s: f64,
    /// Bytes it sent to other stages (hidden rows and ids).
    pub sent_bytes: u64,
}

fn report(
    config: &OptConfig,
    policy: &Policy,
    setup: &BenchSetup,
    step_seconds: &[f64],
    batch: usize,
    wall: f64,
    stages: &[StageStats],
) -> anyhow::Result<()> {
    let per_sec = |tokens: f64, secs: f64| if secs > 0.0 { tokens / secs } else { 0.0 };
    let prefill = step_seconds.first().copied().unwrap_or(0.0);
    let decode: f64 = step_seconds.iter().skip(1).sum();
    let n = batch as f64;
    let total_tput = per_sec(n * setup.gen_len as f64, wall);
    let decode_tput = per_sec(n * (setup.gen_len.saturating_sub(1)) as f64, decode);
    let prefill_tput = per_sec(n * setup.prompt_len as f64, prefill);
    let bubble = |s: &StageStats| {
        if s.wall_s > 0.0 {
            s.wait_s / s.wall_s
        } else {
            0.0
        }
    };
    let mean_bubble = stages.iter().map(bubble).sum::<f64>() / stages.len().max(1) as f64;
    let sent: u64 = stages.iter().map(|s| s.sent_bytes).sum();
    if setup.json {
        let stage_json: Vec<_> = stages
            .iter()
            .enumerate()
            .map(|(r, s)| {
                serde_json::json!({
                    "rank": r,
                    "layers": [s.layers.0, s.layers.1],
                    "wall_s": s.wall_s,
                    "busy_s": s.wall_s - s.wait_s,
                    "wait_s": s.wait_s,
                    "bubble_fraction": bubble(s),
                    "sent_bytes": s.sent_bytes,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "schema_version": JSON_SCHEMA_VERSION,
                "model": config.name,
                "policy": policy.to_flags(),
                "batch": batch,
                "prompt_len": setup.prompt_len,
                "gen_len": setup.gen_len,
                "pipeline": {
                    "stages": stage_json,
                    "bubble_fraction": mean_bubble,
                    "bytes_between_stages": sent,
                },
                "prefill_s": prefill,
                "decode_s": decode,
                "total_s": wall,
                "tokens_per_s": {
                    "prefill": prefill_tput,
                    "decode": decode_tput,
                    "total": total_tput,
                },
            })
        );
        return Ok(());
    }
    outln!(
        "model: {}  pipeline: {} stages  batch: {batch} ({} x {} GPU batches)  prompt {} + gen {}",
        config.name,
        stages.len(),
        policy.gpu_batch_size,
        policy.num_gpu_batches,
        setup.prompt_len,
        setup.gen_len
    );
    for (r, s) in stages.iter().enumerate() {
        outln!(
            "stage {r}: layers {:>3}..{:<3} busy {:>8.3} s  waited {:>8.3} s  bubble {:>5.1}%  sent {:>12} B",
            s.layers.0,
            s.layers.1,
            s.wall_s - s.wait_s,
            s.wait_s,
            100.0 * bubble(s),
            s.sent_bytes
        );
    }
    outln!(
        "bubble fraction (mean over stages): {:.1}%",
        100.0 * mean_bubble
    );
    outln!("bytes between stages: {sent}");
    outln!(
        "throughput: prefill {prefill_tput:.1} tok/s  decode {decode_tput:.1} tok/s  total {total_tput:.1} tok/s \
         ({wall:.3} s)"
    );
    Ok(())
}
