//! The [`GpuProbe`] over strata's own runtime: transfers through the tiers' CPU paths and kernels through the
//! [`Recorder`](crate::gpu::kernels::Recorder) the forward pass uses, so the profile describes what a run will do, not what the hardware could do.
//!
//! Every figure is timed as submit + wait (a blocking device poll) around a batch of identical dispatches or one
//! transfer, after one warm-up, the median of a few tries (a run sees typical dispatches, not the luckiest one). FLOP counts follow the cost model's formulas (COST-MODEL.md):
//! a linear layer of `m` rows is `2 * m * rows * cols`, prefill attention `4 * b * s^2 * h` and decode attention
//! `4 * b * ctx * h`, so the rates plug straight back into the same formulas. Sizes scale with the adapter
//! ([`ProbeSizes::for_gpu`]): small on a CPU driver such as lavapipe, GPU-sized elsewhere, always within one binding.

use std::borrow::Cow;
use std::time::Instant;

use super::measure::{GpuField, GpuProbe};
use crate::config::DType;
use crate::gpu::kernels::{
    encode_act, Act, ActDtype, AttentionShape, CacheDtype, KernelOptions, Kernels, OutRows,
    GEMV_MAX_ROWS, MAX_HEAD_DIM,
};
use crate::gpu::tensor::{GpuMatrix, WeightFormat};
use crate::gpu::{Gpu, GpuError};
use crate::tiers::{measure_bandwidth, TierOptions, Tiers};
use crate::weights::HostTensor;

const GIB: f64 = (1u64 << 30) as f64;

/// Shapes and repetitions of each measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSizes {
    /// Bytes per CPU <-> GPU transfer of the KV cache (a layer's cache block).
    pub cache_bytes: u64,
    /// Bytes per CPU <-> GPU transfer of hidden states (one layer's activations).
    pub hidden_bytes: u64,
    /// Prefill GEMM: rows of x (tokens of a GPU batch).
    pub gemm_m: usize,
    /// Width of the weight matrices (square `width x width`) for both linear shapes.
    pub width: usize,
    /// Decode GEMV: rows of x (sequences, at most [`GEMV_MAX_ROWS`]).
    pub gemv_m: usize,
    /// Attention: sequences.
    pub attn_batch: usize,
    /// Attention: prompt length (prefill) and context length (decode).
    pub attn_seq: usize,
    /// Attention: model width.
    pub attn_hidden: usize,
    /// Attention: heads.
    pub attn_heads: usize,
    /// Dispatches per timed submit.
    pub reps: usize,
    /// Timed tries of each kernel (the median is kept).
    pub iters: usize,
    /// Weight storage of the linear layers.
    pub format: WeightFormat,
}

impl ProbeSizes {
    /// Small shapes for a CPU driver (lavapipe: a few GFLOP/s; the whole profile stays well under a minute). The
    /// weights (2 MiB at f16) are larger than a core's private caches, as a real model's are: a cache-resident
    /// probe overstates the rate a model's layers see, most of all while other processes share the last level.
    pub const CPU_DRIVER: ProbeSizes = ProbeSizes {
        cache_bytes: 8 << 20,
        hidden_bytes: 1 << 20,
        gemm_m: 64,
        width: 1024,
        gemv_m: GEMV_MAX_ROWS,
        attn_batch: 2,
        attn_seq: 128,
        attn_hidden: 256,
        attn_heads: 4,
        reps: 2,
        iters: 3,
        format: WeightFormat::F16,
    };

    /// Shapes of a mid-size OPT layer for a real GPU (OPT-6.7b width, a 2048-token prefill batch).
    pub const GPU: ProbeSizes = ProbeSizes {
        cache_bytes: 256 << 20,
        hidden_bytes: 32 << 20,
        gemm_m: 2048,
        width: 4096,
        gemv_m: GEMV_MAX_ROWS,
        attn_batch: 16,
        attn_seq: 512,
        attn_hidden: 4096,
        attn_heads: 32,
        reps: 10,
        iters: 3,
        format: WeightFormat::F16,
    };

    /// The sizes for `gpu`: [`Self::CPU_DRIVER`] on a CPU adapter, else [`Self::GPU`] shrunk until every buffer
    /// fits one binding.
    pub fn for_gpu(gpu: &Gpu) -> ProbeSizes {
        let mut s = if gpu.info.device_type == wgpu::DeviceType::Cpu {
            Self::CPU_DRIVER
        } else {
            Self::GPU
        };
        let max = gpu.max_binding();
        while s.cache_bytes > max {
            s.cache_bytes /= 2;
        }
        s.hidden_bytes = s.hidden_bytes.min(s.cache_bytes);
        while (s.gemm_m.max(s.width) * s.width * 4) as u64 > max && s.width > 256 {
            s.width /= 2;
            s.gemm_m = s.gemm_m.min(s.width);
        }
        while (s.attn_batch * s.attn_seq * s.attn_hidden * 4) as u64 > max && s.attn_batch > 1 {
            s.attn_batch /= 2;
        }
        s
    }
}

/// Measures [`GpuField`]s on one device through strata's tiers and kernels.
pub struct RuntimeProbe {
    gpu: Gpu,
    kernels: Kernels,
    tiers: Tiers,
    sizes: ProbeSizes,
    /// Both directions at the cache size, from the first of ctog / gtoc_cache (one measurement serves both).
    cache_transfer: Option<(f64, f64)>,
    /// (rows, seconds) of GEMV dispatches of 1, 2, 4, ... `gemv_m` rows (one measurement serves gemv_weight_gib_s
    /// and mm_flops_g_row).
    gemv_secs: Option<Vec<(f64, f64)>>,
}

impl std::fmt::Debug for RuntimeProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeProbe")
            .field("gpu", &self.gpu)
            .field("sizes", &self.sizes)
            .finish()
    }
}

impl RuntimeProbe {
    /// A probe on `gpu` with the sizes [`ProbeSizes::for_gpu`] picks.
    pub fn new(gpu: &Gpu) -> Result<RuntimeProbe, GpuError> {
        Self::with_sizes(gpu, ProbeSizes::for_gpu(gpu))
    }

    /// A probe on `gpu` with explicit sizes.
    pub fn with_sizes(gpu: &Gpu, sizes: ProbeSizes) -> Result<RuntimeProbe, GpuError> {
        let tiers = Tiers::new(&gpu.device, &gpu.queue, TierOptions::default())
            .map_err(|e| GpuError::Upload(format!("setting up the CPU tier: {e}")))?;
        Ok(RuntimeProbe {
            gpu: gpu.clone(),
            // Activations as the f16 models the profile plans for store them (f32 without shader-f16).
            kernels: Kernels::with_options(gpu, KernelOptions::default().with_act(ActDtype::F16)),
            tiers,
            sizes,
            cache_transfer: None,
            gemv_secs: None,
        })
    }

    /// The sizes this probe measures with.
    pub fn sizes(&self) -> ProbeSizes {
        self.sizes
    }

    /// GiB/s of (CPU tier -> GPU, GPU -> CPU tier) for `bytes`-byte transfers.
    fn transfer(&self, bytes: u64) -> Result<(f64, f64), String> {
        let r =
            measure_bandwidth(&self.tiers, bytes, self.sizes.iters).map_err(|e| e.to_string())?;
        // The report is in GB/s (10^9); profiles are in GiB/s.
        Ok((r.cpu_to_gpu * 1e9 / GIB, r.gpu_to_cpu * 1e9 / GIB))
    }

    /// Median seconds of `tries` submits of `reps` recorded operations each, after a warm-up submit.
    fn time<'a>(
        &'a self,
        tries: usize,
        record: impl Fn(&mut crate::gpu::kernels::Recorder<'a>),
    ) -> Result<f64, String> {
        let run = || -> Result<f64, String> {
            let mut rec = self.kernels.recorder();
            for _ in 0..self.sizes.reps.max(1) {
                record(&mut rec);
            }
            let start = Instant::now();
            rec.submit();
            self.gpu
                .device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| format!("waiting for the GPU: {e}"))?;
            Ok(start.elapsed().as_secs_f64())
        };
        run()?;
        let mut times = (0..tries.max(1))
            .map(|_| run())
            .collect::<Result<Vec<f64>, String>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2].max(1e-9))
    }

    fn matrix(&self, rows: usize, cols: usize) -> Result<GpuMatrix, String> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 17) as f32 - 8.0) * 1e-3)
            .collect();
        let tensor = HostTensor {
            dtype: DType::F32,
            shape: vec![rows, cols],
            bytes: Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
        };
        GpuMatrix::upload(&self.gpu, "probe weight", &tensor, self.sizes.format)
            .map_err(|e| e.to_string())
    }

    fn filled(&self, label: &str, elements: usize) -> Result<wgpu::Buffer, String> {
        let values: Vec<f32> = (0..elements).map(|i| ((i % 13) as f32) * 1e-2).collect();
        self.gpu
            .storage_buffer_init(label, bytemuck::cast_slice(&values))
            .map_err(|e| e.to_string())
    }

    /// [`RuntimeProbe::filled`] for activations, stored as the kernels store them.
    fn filled_act(&self, label: &str, elements: usize) -> Result<wgpu::Buffer, String> {
        let values: Vec<f32> = (0..elements).map(|i| ((i % 13) as f32) * 1e-2).collect();
        self.gpu
            .storage_buffer_init(label, &encode_act(&values, self.kernels.act()))
            .map_err(|e| e.to_string())
    }

    /// TFLOP/s of a linear layer with `m` rows of x over a `width x width` weight.
    fn linear_rate(&self, m: usize) -> Result<f64, String> {
        let n = self.sizes.width;
        Ok(2.0 * (m * n * n) as f64 / self.linear_secs(m, self.sizes.iters)? / 1e12)
    }

    /// The affine fit of a decode linear's time in its rows, `t(m) = t0 + m * k`, by least squares over GEMVs of 1,
    /// 2, 4, ... `gemv_m` rows (each the median of several tries: the fit amplifies noise): (weight bytes / t0 in
    /// GiB/s, 2 * width^2 / k in TFLOP/s). A memory-bound GPU's GEMV barely grows with its rows (k near 0); a CPU
    /// driver's grows with each. Both parts stay positive whatever the noise.
    fn gemv_fit(&mut self) -> Result<(f64, f64), String> {
        let points = match &self.gemv_secs {
            Some(p) => p.clone(),
            None => {
                let tries = self.sizes.iters.max(5);
                let rows = std::iter::successors(Some(1usize), |m| Some(m * 2))
                    .take_while(|&m| m <= self.sizes.gemv_m.max(2));
                let mut points = Vec::new();
                for m in rows {
                    points.push((m as f64, self.linear_secs(m, tries)?));
                }
                self.gemv_secs.insert(points).clone()
            }
        };
        let count = points.len() as f64;
        let mean_m = points.iter().map(|p| p.0).sum::<f64>() / count;
        let mean_t = points.iter().map(|p| p.1).sum::<f64>() / count;
        let sxy: f64 = points
            .iter()
            .map(|(m, t)| (m - mean_m) * (t - mean_t))
            .sum();
        let sxx: f64 = points.iter().map(|(m, _)| (m - mean_m).powi(2)).sum();
        let t_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let k = (sxy / sxx).max(t_max * 1e-3);
        let t0 = (mean_t - k * mean_m).max(t_max * 1e-3);
        let n = self.sizes.width;
        let weight_bytes = (n as u64 * self.sizes.format.row_bytes(n)) as f64;
        Ok((weight_bytes / t0 / GIB, 2.0 * (n * n) as f64 / k / 1e12))
    }

    /// Seconds of one dispatch of a linear layer with `m` rows of x over a `width x width` weight, the median of
    /// `tries` submits.
    fn linear_secs(&self, m: usize, tries: usize) -> Result<f64, String> {
        let n = self.sizes.width;
        let w = self.matrix(n, n)?;
        let x = self.filled_act("probe x", m * n)?;
        let out = self.gpu.storage_buffer("probe out", (4 * m * n) as u64);
        let secs = self.time(tries, |rec| {
            rec.linear(
                &x,
                m,
                &w,
                None,
                Act::None,
                &out,
                OutRows::dense(n, 0),
                false,
            );
        })?;
        Ok(secs / self.sizes.reps.max(1) as f64)
    }

    /// GiB/s of weight bytes through a decode linear (one row over a `width x width` weight: the least compute per
    /// weight byte, so the transfer shows) whose weights live in the CPU tier: read in place by the kernel
    /// (`zero_copy`, the DMA path only), or copied into a GPU buffer and then read, in one submit. The two decode
    /// transfer paths of [`crate::offload::policy::Transfer`].
    fn pcie_linear(&self, zero_copy: bool) -> Result<f64, String> {
        let n = self.sizes.width;
        let m = 1;
        let values: Vec<f32> = (0..n * n).map(|i| ((i % 17) as f32 - 8.0) * 1e-3).collect();
        let tensor = HostTensor {
            dtype: DType::F32,
            shape: vec![n, n],
            bytes: Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
        };
        // The weight's chunks in CPU-tier tensors (kept alive here), and GPU buffers of their sizes for the copy path.
        let mut homes = Vec::new();
        let mut copies = Vec::new();
        let cpu = self.tiers.cpu();
        let host = GpuMatrix::build::<GpuError>(
            &self.gpu,
            "probe host weight",
            &tensor,
            self.sizes.format,
            |c| {
                let t = cpu
                    .upload(c.bytes)
                    .map_err(|e| GpuError::Upload(e.to_string()))?;
                let buffer = t.dma_buffer().cloned();
                homes.push(t);
                buffer.ok_or_else(|| {
                    GpuError::Upload("the CPU tier has no DMA path on this device".into())
                })
            },
        )
        .map_err(|e| e.to_string())?;
        if zero_copy
            && !host
                .chunks
                .iter()
                .all(|c| c.buffer.usage().contains(wgpu::BufferUsages::STORAGE))
        {
            return Err("the CPU tier's buffers cannot be bound by kernels".into());
        }
        let on_gpu = GpuMatrix {
            rows: host.rows,
            cols: host.cols,
            format: host.format,
            chunks: host
                .chunks
                .iter()
                .map(|c| {
                    let buffer = self
                        .gpu
                        .storage_buffer("probe weight copy", c.buffer.size());
                    copies.push((c.buffer.clone(), buffer.clone()));
                    crate::gpu::tensor::MatrixChunk {
                        row0: c.row0,
                        rows: c.rows,
                        buffer,
                    }
                })
                .collect(),
        };
        let x = self.filled_act("probe x", m * n)?;
        let out = self.gpu.storage_buffer("probe out", (4 * m * n) as u64);
        let w = if zero_copy { &host } else { &on_gpu };
        let secs = self.time(self.sizes.iters, |rec| {
            if !zero_copy {
                for (src, dst) in &copies {
                    rec.copy(src, 0, dst, 0, src.size().min(dst.size()));
                }
            }
            rec.linear(&x, m, w, None, Act::None, &out, OutRows::dense(n, 0), false);
        })?;
        let bytes: u64 = host.chunks.iter().map(|c| c.buffer.size()).sum();
        Ok((bytes * self.sizes.reps.max(1) as u64) as f64 / secs / GIB)
    }

    /// TFLOP/s of attention: prefill (`s_new = seq`, causal) or decode (one query over `seq` positions).
    fn attention_rate(&self, prefill: bool) -> Result<f64, String> {
        let s = &self.sizes;
        let (b, seq, h) = (s.attn_batch, s.attn_seq, s.attn_hidden);
        let heads = s.attn_heads.max(h.div_ceil(MAX_HEAD_DIM));
        let s_new = if prefill { seq } else { 1 };
        let past = seq - s_new;
        let q = self.filled_act("probe q", b * s_new * h)?;
        let k = self.filled("probe k", b * seq * h)?;
        let v = self.filled("probe v", b * seq * h)?;
        let mask = self
            .gpu
            .storage_buffer_init("probe mask", bytemuck::cast_slice(&vec![1u32; b * seq]))
            .map_err(|e| e.to_string())?;
        let out = self
            .gpu
            .storage_buffer("probe attention out", (4 * b * s_new * h) as u64);
        let shape = AttentionShape {
            batch: b,
            s_new,
            past,
            capacity: seq,
            hidden: h,
            n_head: heads,
        };
        // An f16 cache, as the f16 models the profile plans for keep (the f32 buffers are only partly read).
        let dtype = CacheDtype::F16;
        let secs = self.time(self.sizes.iters, |rec| {
            rec.attention(dtype, &q, &k, &v, &mask, &out, shape)
        })?;
        // The cost model's counts: 4 b s^2 h for a prefill, 4 b ctx h for one decode token.
        let flops = if prefill {
            4.0 * (b * seq * seq * h) as f64
        } else {
            4.0 * (b * seq * h) as f64
        };
        Ok(flops * s.reps.max(1) as f64 / secs / 1e12)
    }
}

impl GpuProbe for RuntimeProbe {
    fn adapter_name(&self) -> String {
        self.gpu.info.name.clone()
    }

    fn describe(&self, field: GpuField) -> String {
        let s = &self.sizes;
        let path = self.tiers.cpu().path();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let fmt = match s.format {
            WeightFormat::F16 => "f16",
            WeightFormat::F32 => "f32",
            WeightFormat::Packed(_) => "packed",
        };
        match field {
            GpuField::Ctog => format!("CPU tier ({path}) -> GPU, {:.0} MiB", mib(s.cache_bytes)),
            GpuField::GtocCache => {
                format!("GPU -> CPU tier ({path}), {:.0} MiB", mib(s.cache_bytes))
            }
            GpuField::GtocHidden => {
                format!("GPU -> CPU tier ({path}), {:.0} MiB", mib(s.hidden_bytes))
            }
            GpuField::MmFlopsP => {
                format!("GEMM {}x{}x{}, {fmt} weights", s.gemm_m, s.width, s.width)
            }
            GpuField::MmFlopsG => {
                format!("GEMV {}x{}x{}, {fmt} weights", s.gemv_m, s.width, s.width)
            }
            GpuField::BmmFlopsP => format!(
                "attention prefill b {} s {} h {}",
                s.attn_batch, s.attn_seq, s.attn_hidden
            ),
            GpuField::BmmFlopsG => format!(
                "attention decode b {} ctx {} h {}",
                s.attn_batch, s.attn_seq, s.attn_hidden
            ),
            GpuField::CtogZeroCopy => format!(
                "GEMV 1x{}x{}, {fmt} weights read in place from the CPU tier ({path})",
                s.width, s.width
            ),
            GpuField::CtogCopyLinear => format!(
                "copy CPU tier ({path}) -> GPU + GEMV 1x{}x{}, {fmt} weights",
                s.width, s.width
            ),
            GpuField::GemvWeight => format!(
                "GEMVs of 1..={} rows x{}x{}, {fmt} weights: the part independent of rows",
                s.gemv_m, s.width, s.width
            ),
            GpuField::MmFlopsGRow => format!(
                "GEMVs of 1..={} rows x{}x{}, {fmt} weights: the part per row",
                s.gemv_m, s.width, s.width
            ),
        }
    }

    fn measure(&mut self, field: GpuField) -> Result<f64, String> {
        let s = self.sizes;
        let value = match field {
            GpuField::Ctog | GpuField::GtocCache => {
                let both = match self.cache_transfer {
                    Some(both) => both,
                    None => *self.cache_transfer.insert(self.transfer(s.cache_bytes)?),
                };
                if field == GpuField::Ctog {
                    both.0
                } else {
                    both.1
                }
            }
            GpuField::GtocHidden => self.transfer(s.hidden_bytes)?.1,
            GpuField::MmFlopsP => self.linear_rate(s.gemm_m)?,
            GpuField::MmFlopsG => self.linear_rate(s.gemv_m)?,
            GpuField::BmmFlopsP => self.attention_rate(true)?,
            GpuField::BmmFlopsG => self.attention_rate(false)?,
            GpuField::CtogZeroCopy => self.pcie_linear(true)?,
            GpuField::CtogCopyLinear => self.pcie_linear(false)?,
            GpuField::GemvWeight => self.gemv_fit()?.0,
            GpuField::MmFlopsGRow => self.gemv_fit()?.1,
        };
        // Free the bind groups cached for this measurement's buffers.
        self.kernels.release_cached_bindings();
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(format!("{}: measured {value}", field.name()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;

    #[test]
    fn sizes_fit_the_binding_and_every_field_measures() {
        // A 2 MiB binding limit: every probe buffer must shrink to fit it.
        let gpu = Gpu::new(&GpuOptions {
            adapter: None,
            max_binding_override: Some(2 << 20),
        })
        .expect("tests need a GPU adapter (lavapipe works)");
        let s = ProbeSizes::for_gpu(&gpu);
        let max = gpu.max_binding();
        assert!(
            s.cache_bytes <= max && s.hidden_bytes <= s.cache_bytes,
            "{s:?}"
        );
        assert!((s.gemm_m.max(s.width) * s.width * 4) as u64 <= max, "{s:?}");
        assert!(
            (s.attn_batch * s.attn_seq * s.attn_hidden * 4) as u64 <= max,
            "{s:?}"
        );
        let mut probe = RuntimeProbe::with_sizes(
            &gpu,
            ProbeSizes {
                reps: 1,
                iters: 1,
                ..s
            },
        )
        .unwrap();
        assert_eq!(probe.adapter_name(), gpu.info.name);
        for field in GpuField::ALL {
            let v = probe.measure(field).unwrap();
            assert!(v.is_finite() && v > 0.0, "{}: {v}", field.name());
        }
    }
}
