//! Test support: a seeded random weight source, a shared GPU, buffer upload / read-back helpers and the linear-layer
//! check the dense and packed kernel tests share.
#![allow(dead_code)] // each test binary uses a different subset

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use strata_runtime::config::{DType, OptConfig};
use strata_runtime::gpu::kernels::{Act, Kernels, OutRows};
use strata_runtime::gpu::tensor::{GpuMatrix, WeightFormat};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::reference;
use strata_runtime::weights::{
    model_tensors, HostTensor, TensorRole, TensorSpec, WeightError, WeightSource,
};

/// splitmix64: a small, seedable generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Encodes f32 values as little-endian bytes of `dtype`.
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Rounds values through `dtype` (what the GPU sees when weights are stored in it).
pub fn round_to(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => values.to_vec(),
        DType::F16 => values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect(),
        DType::BF16 => values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
    }
}

/// Random weights for any config, stored in `config.dtype`. Scales are chosen so activations stay O(1) and logits
/// are well separated (random tiny models otherwise have near-tied logits).
pub struct RandomWeights {
    pub config: OptConfig,
    tensors: HashMap<String, Vec<u8>>,
}

impl RandomWeights {
    pub fn new(config: OptConfig, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut tensors = HashMap::new();
        for spec in model_tensors(&config) {
            let n = spec.numel();
            let values = match spec.role {
                TensorRole::TokenEmbedding | TensorRole::PositionEmbedding => rng.vec(n, 1.0),
                TensorRole::LinearWeight => rng.vec(n, 2.0 / (spec.shape[1] as f32).sqrt()),
                TensorRole::Bias => rng.vec(n, 0.2),
                TensorRole::LayerNorm if spec.name.ends_with("weight") => {
                    rng.vec(n, 0.3).into_iter().map(|v| 1.0 + v).collect()
                }
                TensorRole::LayerNorm => rng.vec(n, 0.2),
            };
            tensors.insert(spec.name.clone(), encode(&values, config.dtype));
        }
        RandomWeights { config, tensors }
    }
}

impl WeightSource for RandomWeights {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let bytes = self
            .tensors
            .get(&spec.name)
            .ok_or_else(|| WeightError::Missing {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            })?;
        Ok(HostTensor {
            dtype: self.config.dtype,
            shape: spec.shape.clone(),
            bytes: Cow::Borrowed(bytes),
        })
    }
}

/// A tiny pre-LN OPT (opt-125m's shape family) to derive variants from.
pub fn tiny_config() -> OptConfig {
    OptConfig {
        vocab_size: 61,
        max_seq_len: 40,
        dtype: DType::F32,
        ..OptConfig::opt("tiny-opt", 2, 4, 32, 48)
    }
}

/// The device every test shares (lavapipe on CPU machines).
pub fn gpu() -> Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(&GpuOptions::default()).expect("tests need a GPU adapter (lavapipe works)")
    })
    .clone()
}

/// A device whose bindings are capped at `bytes`, to force row chunking.
pub fn gpu_with_binding(bytes: u64) -> Gpu {
    Gpu::new(&GpuOptions {
        adapter: None,
        max_binding_override: Some(bytes),
    })
    .expect("tests need a GPU adapter (lavapipe works)")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A storage buffer holding `values`.
pub fn upload(gpu: &Gpu, values: &[f32]) -> wgpu::Buffer {
    gpu.storage_buffer_init("test input", bytemuck::cast_slice(values))
        .unwrap()
}

/// A storage buffer holding u32 `values` (token ids, masks).
pub fn upload_u32(gpu: &Gpu, values: &[u32]) -> wgpu::Buffer {
    gpu.storage_buffer_init("test ids", bytemuck::cast_slice(values))
        .unwrap()
}

/// The first `count` u32 values of `buffer`.
pub fn read_u32(gpu: &Gpu, buffer: &wgpu::Buffer, count: usize) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(&gpu.read_back(&[(buffer, 0, 4 * count as u64)]).unwrap()[0])
}

/// A `[rows, cols]` f32 host matrix uploaded in `format` (rounded to f16 or quantised on the way, as for weights).
pub fn matrix(
    gpu: &Gpu,
    values: &[f32],
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> GpuMatrix {
    let tensor = HostTensor {
        dtype: DType::F32,
        shape: vec![rows, cols],
        bytes: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
    };
    GpuMatrix::upload(gpu, "test matrix", &tensor, format).unwrap()
}

/// The (activation, bias, accumulate) epilogues every linear-layer test covers.
pub const EPILOGUES: [(Act, bool, bool); 3] = [
    (Act::None, false, false),
    (Act::Relu, true, false),
    (Act::Gelu, true, true),
];

/// One linear layer: `x [m, k] @ w [n, k]^T`, then bias, activation and accumulation into the output's old values.
#[derive(Clone, Copy, Debug)]
pub struct LinearCase {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub act: Act,
    pub bias: bool,
    pub accumulate: bool,
}

impl LinearCase {
    /// The case for shape `(m, k, n)` and one of [`EPILOGUES`].
    pub fn new(
        (m, k, n): (usize, usize, usize),
        (act, bias, accumulate): (Act, bool, bool),
    ) -> Self {
        LinearCase {
            m,
            k,
            n,
            act,
            bias,
            accumulate,
        }
    }

    /// Runs the layer on the GPU with random inputs from `Rng(seed)` and the weight uploaded in `format`, and on the
    /// CPU over `seen(w)` (the weight as the GPU holds it); returns the largest difference.
    pub fn max_diff(
        &self,
        gpu: &Gpu,
        format: WeightFormat,
        seed: u64,
        seen: impl FnOnce(&[f32]) -> Vec<f32>,
    ) -> f32 {
        let LinearCase {
            m,
            k,
            n,
            act,
            bias,
            accumulate,
        } = *self;
        let mut rng = Rng(seed);
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let b = rng.vec(n, 1.0);
        let init = rng.vec(m * n, 1.0);
        let kernels = Kernels::new(gpu);
        let wm = matrix(gpu, &w, n, k, format);
        let (xb, bb, out) = (upload(gpu, &x), upload(gpu, &b), upload(gpu, &init));
        let mut rec = kernels.recorder();
        rec.linear(
            &xb,
            m,
            &wm,
            bias.then_some(&bb),
            act,
            &out,
            OutRows::dense(n, 0),
            accumulate,
        );
        rec.submit();
        let got = gpu.read_f32(&out, 0, m * n).unwrap();

        let mut want = reference::matmul_t(&x, m, k, &seen(&w), n);
        for r in 0..m {
            for c in 0..n {
                let mut v = want[r * n + c] + if bias { b[c] } else { 0.0 };
                v = match act {
                    Act::None => v,
                    Act::Relu => v.max(0.0),
                    Act::Gelu => reference::gelu(v),
                };
                want[r * n + c] = v + if accumulate { init[r * n + c] } else { 0.0 };
            }
        }
        max_abs_diff(&got, &want)
    }
}
