//! Synthetic weights for running and benchmarking a model without a checkpoint.
//!
//! [`DummyWeights`] implements [`WeightSource`] by generating each tensor on demand, in the config's dtype. Element `i`
//! of a tensor is a pure function of (seed, tensor name, `i`): a counter-based hash (splitmix64's finaliser) picks one
//! of 4096 evenly spaced levels in `(-scale, scale)`, four elements per hash. Nothing depends on thread scheduling, so
//! the bytes are identical across runs, thread counts and machines, and tensors can be generated in parallel chunks.
//!
//! Scales keep activations bounded: matrices and embeddings are uniform in `±1/sqrt(in_features)` (so a matrix-vector
//! product of a unit-variance input has variance about 1/3), layer norm weights are 1 and all biases are uniform in
//! `±0.02`.

use std::borrow::Cow;
use std::collections::HashMap;

use rayon::prelude::*;

use crate::config::{DType, OptConfig};
use crate::weights::{
    model_tensors, HostTensor, TensorRole, TensorSpec, WeightError, WeightSource,
};

/// Number of distinct values a random tensor draws from (12 bits of hash per element).
const LEVELS: usize = 4096;
/// Bits of hash per element.
const LEVEL_BITS: u32 = 12;
/// Elements per hash: 4 x 12 bits from the well-mixed top 48 bits.
const PER_HASH: usize = 4;
/// Elements generated per rayon task; a multiple of `PER_HASH` so task boundaries fall between hashes.
const TASK_ELEMS: usize = 1 << 16;
/// Half-width of the bias distribution.
const BIAS_SCALE: f32 = 0.02;

/// Deterministic synthetic weights for `config`, generated tensor by tensor.
#[derive(Clone, Debug)]
pub struct DummyWeights {
    config: OptConfig,
    seed: u64,
    shapes: HashMap<String, Vec<usize>>,
}

impl DummyWeights {
    /// Synthetic weights for every tensor of [`model_tensors`]`(config)`, with seed 0.
    pub fn new(config: OptConfig) -> DummyWeights {
        let shapes = model_tensors(&config)
            .into_iter()
            .map(|spec| (spec.name, spec.shape))
            .collect();
        DummyWeights {
            config,
            seed: 0,
            shapes,
        }
    }

    /// The same weights under another seed (a different, equally deterministic model).
    pub fn with_seed(self, seed: u64) -> DummyWeights {
        DummyWeights { seed, ..self }
    }

    /// How `spec` is filled: a constant, or uniform levels in `(-scale, scale)`.
    fn distribution(spec: &TensorSpec) -> Fill {
        let in_features = |spec: &TensorSpec| spec.shape.get(1).copied().unwrap_or(1).max(1) as f32;
        match spec.role {
            TensorRole::LayerNorm if spec.name.ends_with(".weight") => Fill::Constant(1.0),
            TensorRole::LayerNorm | TensorRole::Bias => Fill::Uniform(BIAS_SCALE),
            TensorRole::LinearWeight
            | TensorRole::TokenEmbedding
            | TensorRole::PositionEmbedding => Fill::Uniform(1.0 / in_features(spec).sqrt()),
        }
    }

    /// Writes the bytes of `spec` in `dtype` (little-endian) into `out`, replacing its contents.
    fn generate(&self, spec: &TensorSpec, dtype: DType, out: &mut Vec<u8>) {
        let n = spec.numel();
        let seed = self.tensor_seed(&spec.name);
        let fill_with = Self::distribution(spec);
        out.clear();
        out.resize(n * dtype.size_bytes() as usize, 0);
        match dtype {
            DType::F16 => fill::<2>(out, seed, fill_with, |v| {
                half::f16::from_f32(v).to_bits().to_le_bytes()
            }),
            DType::BF16 => fill::<2>(out, seed, fill_with, |v| {
                half::bf16::from_f32(v).to_bits().to_le_bytes()
            }),
            DType::F32 => fill::<4>(out, seed, fill_with, f32::to_le_bytes),
        }
    }

    /// Like [`WeightSource::load`], but writes the bytes into `out` (resized to fit), so a caller that uploads tensor
    /// by tensor can reuse one buffer instead of faulting in fresh pages for every tensor.
    pub fn load_into(&self, spec: &TensorSpec, out: &mut Vec<u8>) -> Result<(), WeightError> {
        self.check(spec)?;
        self.generate(spec, self.config.dtype, out);
        Ok(())
    }

    /// `spec` must be one of the config's tensors, with its shape.
    fn check(&self, spec: &TensorSpec) -> Result<(), WeightError> {
        let expected = self
            .shapes
            .get(&spec.name)
            .ok_or_else(|| WeightError::Missing {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            })?;
        if *expected != spec.shape {
            return Err(WeightError::Shape {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: expected.clone(),
            });
        }
        Ok(())
    }

    /// FNV-1a of the name, mixed with the global seed: distinct tensors get unrelated streams.
    fn tensor_seed(&self, name: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        mix(h ^ mix(self.seed))
    }
}

impl WeightSource for DummyWeights {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let mut bytes = Vec::new();
        self.load_into(spec, &mut bytes)?;
        Ok(HostTensor {
            dtype: self.config.dtype,
            shape: spec.shape.clone(),
            bytes: Cow::Owned(bytes),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Fill {
    Constant(f32),
    Uniform(f32),
}

/// splitmix64's finaliser: a bijective 64-bit mix with full avalanche.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with elements of `E` bytes each. Values are encoded once into a 4096-entry table; each element is then
/// one lookup.
fn fill<const E: usize>(out: &mut [u8], seed: u64, fill: Fill, encode: impl Fn(f32) -> [u8; E])
where
    [u8; E]: bytemuck::Pod,
{
    // `[u8; E]` has alignment 1 and `out` holds whole elements, so viewing the bytes as elements always succeeds.
    let elements: &mut [[u8; E]] = bytemuck::cast_slice_mut(out);
    match fill {
        Fill::Constant(v) => {
            let value = encode(v);
            elements
                .par_chunks_mut(TASK_ELEMS)
                .for_each(|task| task.fill(value));
        }
        Fill::Uniform(scale) => {
            let mut table = Box::new([[0u8; E]; LEVELS]);
            for (k, entry) in table.iter_mut().enumerate() {
                *entry = encode(scale * ((2 * k + 1) as f32 / LEVELS as f32 - 1.0));
            }
            let table = &*table;
            elements
                .par_chunks_mut(TASK_ELEMS)
                .enumerate()
                .for_each(|(t, task)| {
                    fill_uniform(task, table, seed, (t * TASK_ELEMS / PER_HASH) as u64)
                });
        }
    }
}

/// Fills `task`, whose first element is element `PER_HASH * first_hash` of the tensor.
#[inline]
fn fill_uniform<const E: usize>(
    task: &mut [[u8; E]],
    table: &[[u8; E]; LEVELS],
    seed: u64,
    first_hash: u64,
) {
    let hash = |counter: u64| mix(seed.wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    // Masking with LEVELS - 1 keeps every index in the table, so the lookups need no bounds checks.
    let level = |h: u64, k: u32| (h >> (64 - LEVEL_BITS * (k + 1))) as usize & (LEVELS - 1);
    let mut groups = task.chunks_exact_mut(PER_HASH);
    let mut counter = first_hash;
    for group in &mut groups {
        let h = hash(counter);
        counter += 1;
        if let Ok(group) = <&mut [[u8; E]; PER_HASH]>::try_from(group) {
            group[0] = table[level(h, 0)];
            group[1] = table[level(h, 1)];
            group[2] = table[level(h, 2)];
            group[3] = table[level(h, 3)];
        }
    }
    let h = hash(counter);
    for (k, element) in groups.into_remainder().iter_mut().enumerate() {
        *element = table[level(h, k as u32)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::to_f32;
    use crate::weights::{LayerPart, LayerTensor, Param, TensorId};

    fn tiny(dtype: DType) -> OptConfig {
        OptConfig {
            vocab_size: 1000,
            max_seq_len: 64,
            dtype,
            ..OptConfig::opt("tiny-dummy", 2, 4, 64, 256)
        }
    }

    #[test]
    fn deterministic_and_distinct_per_tensor() {
        let a = DummyWeights::new(tiny(DType::F16));
        let b = DummyWeights::new(tiny(DType::F16));
        let specs = model_tensors(a.config());
        let fc1 = specs
            .iter()
            .find(|s| s.name == "decoder.layers.0.fc1.weight")
            .unwrap();
        let fc1_1 = specs
            .iter()
            .find(|s| s.name == "decoder.layers.1.fc1.weight")
            .unwrap();
        let x = a.load(fc1).unwrap();
        assert_eq!(x.bytes, b.load(fc1).unwrap().bytes);
        assert_ne!(x.bytes, a.load(fc1_1).unwrap().bytes);
        assert_ne!(x.bytes, a.clone().with_seed(1).load(fc1).unwrap().bytes);
        // Same stream whatever the thread count.
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let y = single.install(|| a.load(fc1).unwrap());
        assert_eq!(x.bytes, y.bytes);
        // load_into reuses a buffer that held a bigger tensor and yields the same bytes.
        let mut buffer = a.load(&specs[0]).unwrap().bytes.into_owned();
        assert!(buffer.len() > x.bytes.len());
        a.load_into(fc1, &mut buffer).unwrap();
        assert_eq!(buffer[..], x.bytes[..]);
    }

    #[test]
    fn values_follow_the_documented_distribution() {
        let w = DummyWeights::new(tiny(DType::F32));
        for spec in model_tensors(w.config()) {
            let t = w.load(&spec).unwrap();
            assert_eq!(t.dtype, DType::F32);
            assert_eq!(t.bytes.len(), spec.numel() * 4, "{}", spec.name);
            let v = to_f32(&t);
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            if spec.role == TensorRole::LayerNorm && spec.name.ends_with(".weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{}", spec.name);
                continue;
            }
            let bound = match spec.role {
                TensorRole::Bias | TensorRole::LayerNorm => BIAS_SCALE,
                _ => 1.0 / (spec.shape[1] as f32).sqrt(),
            };
            assert!(
                max < bound && max > 0.9 * bound,
                "{}: max {max}, bound {bound}",
                spec.name
            );
            // Uniform on (-b, b): mean about 0, variance b^2 / 3.
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            let b = bound as f64;
            assert!(
                mean.abs() < 4.0 * b / (3.0 * n).sqrt(),
                "{}: mean {mean}",
                spec.name
            );
            assert!(
                (var / (b * b / 3.0) - 1.0).abs() < 0.25,
                "{}: var {var}",
                spec.name
            );
        }
    }

    #[test]
    fn dtypes_encode_the_same_values() {
        let spec = model_tensors(&tiny(DType::F32))
            .into_iter()
            .find(|s| s.name == "decoder.layers.1.self_attn.q_proj.weight")
            .unwrap();
        let f32s = to_f32(&DummyWeights::new(tiny(DType::F32)).load(&spec).unwrap());
        let f16s = to_f32(&DummyWeights::new(tiny(DType::F16)).load(&spec).unwrap());
        let bf16s = to_f32(&DummyWeights::new(tiny(DType::BF16)).load(&spec).unwrap());
        for i in 0..f32s.len() {
            assert!(
                (f32s[i] - f16s[i]).abs() <= f32s[i].abs() * 1e-3 + 1e-7,
                "{i}"
            );
            assert!(
                (f32s[i] - bf16s[i]).abs() <= f32s[i].abs() * 8e-3 + 1e-7,
                "{i}"
            );
        }
    }

    #[test]
    fn unknown_or_misshapen_tensors_are_errors() {
        let w = DummyWeights::new(tiny(DType::F16));
        let bogus = TensorSpec {
            name: "decoder.layers.9.fc1.weight".into(),
            shape: vec![256, 64],
            role: TensorRole::LinearWeight,
            id: TensorId::Layer(
                9,
                LayerTensor {
                    part: LayerPart::Fc1,
                    param: Param::Weight,
                },
            ),
        };
        let err = w.load(&bogus).unwrap_err().to_string();
        assert!(err.contains("decoder.layers.9.fc1.weight"), "{err}");
        let wrong = TensorSpec {
            name: "decoder.layers.0.fc1.weight".into(),
            shape: vec![64, 256],
            ..bogus
        };
        let err = w.load(&wrong).unwrap_err().to_string();
        assert!(err.contains("expected [64, 256], found [256, 64]"), "{err}");
    }
}
