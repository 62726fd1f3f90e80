//! Timing one kernel on fixed shapes, for `strata bench kernels` and tests: what each kernel variant achieves on
//! this device, in seconds, FLOP/s and bytes/s.
//!
//! A measurement records `reps` identical dispatches in one step and takes the best of `iters` submits after a
//! warm-up. Where the device writes timestamps (`TIMESTAMP_QUERY`) the time is the GPU's own, from the start of the
//! step's first dispatch to the end of its last ([`GpuTimer`]); elsewhere it is wall time from submit to the device
//! going idle, which also counts the submit (tens of microseconds, more than a decode-sized kernel) and says so.

use std::time::Instant;

use super::attention::AttentionKernel;
use super::linear::{LinearCall, LinearKernel, Variant};
use super::variants::encode_act;
use super::{AttentionShape, CacheDtype, Kernels, OutRows, Recorder};
use crate::config::DType;
use crate::gpu::tensor::{GpuMatrix, WeightFormat};
use crate::gpu::timer::GpuTimer;
use crate::gpu::{Gpu, GpuError};
use crate::weights::HostTensor;

/// How a measurement was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The GPU's timestamps around the recorded dispatches.
    GpuTimestamps,
    /// Wall time from submit until the device is idle (no timestamp queries on this device).
    WallTime,
}

impl Clock {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Clock::GpuTimestamps => "gpu-timestamps",
            Clock::WallTime => "wall",
        }
    }
}

/// Seconds per dispatch of what `record` records (once per call), measured as the module comment says. A warm-up
/// step of one dispatch sizes the timed steps: as many dispatches as fill about [`STEP_SECONDS`], at most `reps`
/// (so a prefill GEMM runs a few times, a decode GEMV many).
pub fn time_recorded<'k>(
    kernels: &'k Kernels,
    reps: usize,
    iters: usize,
    record: &dyn Fn(&mut Recorder<'k>),
) -> Result<(f64, Clock), GpuError> {
    let gpu: &Gpu = kernels.gpu();
    let timer = GpuTimer::new(gpu);
    let run = |reps: usize| -> Result<f64, GpuError> {
        let mut rec = kernels.recorder();
        for _ in 0..reps {
            record(&mut rec);
        }
        let start = Instant::now();
        match &timer {
            Some(timer) => {
                rec.submit_timed(timer);
                timer.seconds(gpu)
            }
            None => {
                rec.submit();
                gpu.device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| GpuError::Readback(e.to_string()))?;
                Ok(start.elapsed().as_secs_f64())
            }
        }
        .map(|seconds| seconds / reps as f64)
    };
    let once = run(1)?;
    let reps = ((STEP_SECONDS / once.max(1e-9)).ceil() as usize).clamp(1, reps.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        best = best.min(run(reps)?);
    }
    let clock = if timer.is_some() {
        Clock::GpuTimestamps
    } else {
        Clock::WallTime
    };
    Ok((best, clock))
}

/// How long a timed step aims to run: long enough that a submit's overhead and the timer's resolution vanish.
pub const STEP_SECONDS: f64 = 0.02;

/// The shape of one linear layer: `m` rows of x, a `[n, k]` weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of x (tokens).
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

/// One linear layer's measured time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearTiming {
    /// The kernel that ran (its variant and tiles).
    pub kernel: LinearKernel,
    /// Seconds per layer (best of the tries, averaged over the dispatches of one submit).
    pub seconds: f64,
    /// How it was timed.
    pub clock: Clock,
    /// Floating-point operations per layer, `2 m n k`.
    pub flops: f64,
    /// Bytes of the weight as stored on the GPU (each read once per layer by every kernel).
    pub weight_bytes: u64,
}

/// Times one linear layer of `shape` with weights in `format` on `kernels`' device, with `kernel` (exactly) or
/// `variant` forced (both `None`: the kernels' own choice), `reps` layers per step, best of `iters` steps
/// ([`time_recorded`]). An unavailable variant or a kernel the device cannot run is [`GpuError::Unsupported`].
pub fn bench_linear(
    kernels: &Kernels,
    shape: LinearShape,
    format: WeightFormat,
    variant: Option<Variant>,
    kernel: Option<LinearKernel>,
    reps: usize,
    iters: usize,
) -> Result<LinearTiming, GpuError> {
    let LinearShape { m, n, k } = shape;
    if let Some(v) = variant {
        kernels
            .variant_available(v)
            .map_err(GpuError::Unsupported)?;
    }
    if let Some(forced) = kernel {
        if !kernels.can_run(forced, m) {
            return Err(GpuError::Unsupported(format!(
                "{forced} for {m} rows on {}",
                kernels.gpu().describe()
            )));
        }
    }
    let gpu: &Gpu = kernels.gpu();
    let values: Vec<f32> = (0..n * k).map(|i| ((i % 17) as f32 - 8.0) * 1e-3).collect();
    let tensor = HostTensor {
        dtype: DType::F32,
        shape: vec![n, k],
        bytes: std::borrow::Cow::Borrowed(bytemuck::cast_slice(&values)),
    };
    let w = GpuMatrix::upload(gpu, "bench weight", &tensor, format)?;
    drop(values);
    let act = kernels.act();
    let xs: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32) * 1e-2).collect();
    let x = gpu.storage_buffer_init("bench x", &encode_act(&xs, act))?;
    drop(xs);
    let out = gpu.storage_buffer("bench out", (m * n * act.bytes()) as u64);
    let (seconds, clock) = time_recorded(kernels, reps, iters, &|rec| {
        rec.linear_call(LinearCall {
            variant,
            kernel,
            ..LinearCall::new(&x, m, &w, None, &out, OutRows::dense(n, 0))
        })
    })?;
    let ran = kernel.unwrap_or_else(|| {
        w.chunks.first().map_or(
            LinearKernel::Gemv {
                rows: 1,
                subgroup: false,
            },
            |c| kernels.linear_kernel(m, c.rows, format, variant),
        )
    });
    Ok(LinearTiming {
        kernel: ran,
        seconds,
        clock,
        flops: 2.0 * (m * n * k) as f64,
        weight_bytes: w.bytes(),
    })
}

/// The linear shapes `strata bench kernels` times, named: the f16 GEMM 8192^3, opt-6.7b's prefill linears at 64 x 512
/// tokens, and its decode linears at 1, 8, 32 and 64 rows. `scale` divides every dimension (at least 1; for devices
/// whose bindings cannot hold the full shapes, such as lavapipe in CI).
pub fn linear_bench_shapes(scale: usize) -> Vec<(String, LinearShape)> {
    let d = |x: usize| (x / scale.max(1)).max(1);
    let mut shapes = vec![(
        format!("gemm {}^3", d(8192)),
        LinearShape {
            m: d(8192),
            n: d(8192),
            k: d(8192),
        },
    )];
    let tokens = d(64 * 512);
    for (name, n, k) in [
        ("q/k/v/out_proj", 4096, 4096),
        ("fc1", 16384, 4096),
        ("fc2", 4096, 16384),
    ] {
        shapes.push((
            format!("prefill {name} ({tokens} tokens)"),
            LinearShape {
                m: tokens,
                n: d(n),
                k: d(k),
            },
        ));
    }
    for m in [1, 8, 32, 64] {
        for (n, k) in [(4096, 4096), (16384, 4096), (4096, 16384)] {
            let (n, k) = (d(n), d(k));
            shapes.push((format!("decode m={m} {k}->{n}"), LinearShape { m, n, k }));
        }
    }
    shapes
}

/// One attention step's measured time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionTiming {
    /// The kernel that ran.
    pub kernel: AttentionKernel,
    /// Seconds per step (best of the tries, averaged over the dispatches of one submit).
    pub seconds: f64,
    /// How it was timed.
    pub clock: Clock,
    /// Floating-point operations ([`AttentionShape::flops`]).
    pub flops: f64,
    /// Bytes it must move at least ([`AttentionShape::min_bytes`]).
    pub bytes: u64,
}

/// Times the dense attention of `shape` over a cache of `dtype` with `kernel` (or the kernels' own choice), with
/// every key real, `reps` dispatches per step, best of `iters` steps ([`time_recorded`]).
pub fn bench_attention(
    kernels: &Kernels,
    shape: AttentionShape,
    dtype: CacheDtype,
    kernel: Option<AttentionKernel>,
    reps: usize,
    iters: usize,
) -> Result<AttentionTiming, GpuError> {
    let gpu: &Gpu = kernels.gpu();
    let act = kernels.act();
    let rows = shape.batch * shape.s_new;
    let qs: Vec<f32> = (0..rows * shape.hidden)
        .map(|i| ((i % 29) as f32 - 14.0) * 1e-2)
        .collect();
    let q = gpu.storage_buffer_init("bench q", &encode_act(&qs, act))?;
    drop(qs);
    let cache_values = shape.batch * shape.capacity * shape.hidden;
    let cache_bytes = match dtype {
        CacheDtype::F32 => (0..cache_values)
            .flat_map(|i| (((i % 23) as f32 - 11.0) * 1e-2).to_le_bytes())
            .collect::<Vec<u8>>(),
        CacheDtype::F16 => (0..cache_values)
            .flat_map(|i| half::f16::from_f32(((i % 23) as f32 - 11.0) * 1e-2).to_le_bytes())
            .collect(),
    };
    let k = gpu.storage_buffer_init("bench k cache", &cache_bytes)?;
    let v = gpu.storage_buffer_init("bench v cache", &cache_bytes)?;
    drop(cache_bytes);
    let mask_words = vec![1u32; shape.batch * shape.capacity];
    let mask = gpu.storage_buffer_init("bench mask", bytemuck::cast_slice(&mask_words))?;
    let out = gpu.storage_buffer(
        "bench attention out",
        (rows * shape.hidden * act.bytes()) as u64,
    );
    let ran = kernel.unwrap_or_else(|| kernels.attention_kernel(&shape));
    let (seconds, clock) = time_recorded(kernels, reps, iters, &|rec| {
        rec.attention_with(ran, dtype, &q, &k, &v, &mask, &out, shape)
    })?;
    Ok(AttentionTiming {
        kernel: ran,
        seconds,
        clock,
        flops: shape.flops() as f64,
        bytes: shape.min_bytes(dtype, act),
    })
}

/// The attention shapes `strata bench kernels` times, named: opt-6.7b's prefill of 64 sequences x 512 tokens and
/// its decode step of 64 sequences over 544 keys (32 heads of 128). `scale` divides the batch and the sequence
/// lengths (the head shape stays).
pub fn attention_bench_shapes(scale: usize) -> Vec<(String, AttentionShape)> {
    let d = |x: usize| (x / scale.max(1)).max(1);
    let (batch, prompt, keys) = (d(64), d(512), d(544));
    vec![
        (
            format!("prefill {batch} x {prompt} tokens"),
            AttentionShape {
                batch,
                s_new: prompt,
                past: 0,
                capacity: prompt,
                hidden: 4096,
                n_head: 32,
            },
        ),
        (
            format!("decode {batch} x {keys} keys"),
            AttentionShape {
                batch,
                s_new: 1,
                past: keys - 1,
                capacity: keys,
                hidden: 4096,
                n_head: 32,
            },
        ),
    ]
}
