//! Group-wise compression on the CPU: error bounds, strata's grouping against FlexLLMGen's, the file format, and the
//! memory formulas in `OptConfig` against the packed sizes of `model_tensors`.

use half::f16;
use strata_runtime::checkpoint::{
    from_packed_bytes, host_tensor_to_f32, load_packed_file, save_packed_file, to_packed_bytes,
    write_packed_model, PackedCheckpoint, StoredTensor,
};
use strata_runtime::compress::{
    dequantize, flexllmgen_dequantize, flexllmgen_quantize, packed_bytes, packed_cache_bytes,
    quantize, quantize_cache, CompressError, CompressionConfig, PackedTensor,
};
use strata_runtime::config::{Activation, DType, OptConfig};
use strata_runtime::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

/// A small deterministic generator (splitmix64) so the tests need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn gaussian(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Random, constant and outlier-heavy rows of `cols` elements: `rows` rows in total.
fn mixed_tensor(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let x = match r % 4 {
                0 => rng.gaussian() * 0.02,
                1 => 0.37,
                // One large outlier per 16 elements among small values.
                2 if c % 16 == 3 => 40.0 * (rng.uniform() - 0.5),
                2 => rng.gaussian() * 0.01,
                _ => rng.uniform() * 1000.0 - 300.0,
            };
            out.push(x);
        }
    }
    out
}

/// The largest error of `decoded` against `values` in each group, with the group's min and max.
fn group_errors(
    values: &[f32],
    decoded: &[f32],
    cols: usize,
    group: usize,
) -> Vec<(f32, f32, f32)> {
    let mut out = Vec::new();
    for (row, dec) in values.chunks(cols).zip(decoded.chunks(cols)) {
        for (g, d) in row.chunks(group).zip(dec.chunks(group)) {
            let mn = g.iter().copied().fold(f32::INFINITY, f32::min);
            let mx = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let err = g
                .iter()
                .zip(d)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            out.push((err, mn, mx));
        }
    }
    out
}

/// One unit in the last place of `x` in fp16.
fn f16_ulp(x: f32) -> f32 {
    let h = f16::from_f32(x.abs());
    f16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()
}

#[test]
fn round_trip_error_is_half_a_step_up_to_fp16_rounding() {
    let mut rng = Rng(1);
    for bits in [2u8, 4, 8] {
        for (group, cols) in [(64usize, 200usize), (64, 64), (32, 45), (128, 300)] {
            let config = CompressionConfig::new(bits, group).unwrap();
            let rows = 12;
            let values = mixed_tensor(&mut rng, rows, cols);
            let packed = quantize(&values, rows, cols, config).unwrap();
            assert_eq!(packed.byte_len(), packed_bytes(rows, cols, config));
            let decoded = dequantize(&packed);
            let levels = config.max_level() as f32;
            for (err, mn, mx) in group_errors(&values, &decoded, cols, group) {
                // Half a step of the exact grid, widened by fp16 rounding of min (down) and step (up, times the
                // largest level), plus f32 arithmetic.
                let step = (mx - mn) / levels;
                // No subnormal is stored: a tiny min or step moves by up to 2^-14.
                let tiny = f16::MIN_POSITIVE.to_f32();
                let flush = if mn.abs() < tiny || step < tiny {
                    tiny
                } else {
                    0.0
                };
                let bound = step / 2.0
                    + f16_ulp(mn)
                    + levels * f16_ulp(step)
                    + flush
                    + 1e-6 * mx.abs().max(mn.abs());
                assert!(
                    err <= bound,
                    "bits {bits} group {group}: error {err} > {bound} on [{mn}, {mx}]"
                );
            }
        }
    }
}

#[test]
fn four_bit_error_is_within_range_over_30_on_fp16_groups() {
    // Weights from an fp16 checkpoint have fp16 minima; with an fp16-exact step the bound holds as the issue
    // states it: (max - min) / 30 per element.
    let mut rng = Rng(2);
    let config = CompressionConfig::DEFAULT;
    let (rows, cols) = (64, 192);
    let mut values = Vec::new();
    for r in 0..rows {
        // min = -0.5 * 2^-k, range = 15 * 2^-j: exactly representable min and step.
        let min = -0.5 / (1 << (r % 5)) as f32;
        let range = 15.0 / (1 << (4 + r % 7)) as f32;
        for c in 0..cols {
            let x = match (r % 3, c % 64) {
                (_, 0) => min,
                (_, 1) => min + range,
                (0, _) => min + range * rng.uniform(),
                (1, _) => min + range * 0.5, // constant apart from the two ends
                _ if c % 9 == 0 => min + range * rng.uniform(), // outliers above a near-constant floor
                _ => min + range * 0.01 * rng.uniform(),
            };
            values.push(f16::from_f32(x).to_f32().clamp(min, min + range));
        }
    }
    let decoded = dequantize(&quantize(&values, rows, cols, config).unwrap());
    for (err, mn, mx) in group_errors(&values, &decoded, cols, 64) {
        assert!(
            err <= (mx - mn) / 30.0,
            "error {err} > (max - min) / 30 on [{mn}, {mx}]"
        );
    }
    // A constant group decodes exactly.
    let constant = vec![0.37f32; 130];
    let decoded = dequantize(&quantize(&constant, 1, 130, config).unwrap());
    let exact = f16::from_f32(0.37).to_f32();
    assert!(decoded
        .iter()
        .all(|&x| x == exact || (x - 0.37).abs() <= f16_ulp(0.37)));
}

#[test]
fn layout_places_values_where_the_docs_say() {
    let config = CompressionConfig::DEFAULT;
    // Row r, column c holds level c % 16 exactly when the group spans 0..15 with min 0 and step 1.
    let (rows, cols) = (3, 70);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            if i % cols % 64 == 1 {
                15.0
            } else {
                (i % cols % 16) as f32
            }
        })
        .collect();
    let packed = quantize(&values, rows, cols, config).unwrap();
    let layout = packed.layout();
    assert_eq!(layout.words_per_row, 16);
    for r in 0..rows {
        for c in [0usize, 5, 17, 63, 64, 69] {
            let word = packed.words()[r * layout.words_per_row + c / 8];
            let q = (word >> ((c % 8) * 4)) & 15;
            let (step, min) = packed.group_params(r, c / 64);
            assert_eq!(q as f32 * step + min, values[r * cols + c], "({r}, {c})");
        }
        // The scale word: step low, min high.
        let word = packed.scale_words()[r * layout.groups_per_row];
        assert_eq!(f16::from_bits(word as u16).to_f32(), 1.0);
        assert_eq!(f16::from_bits((word >> 16) as u16).to_f32(), 0.0);
    }
    // Padding of the last group stays 0.
    let last = packed.words()[layout.words_per_row - 1];
    assert_eq!(last >> ((70 % 8) * 4), 0);
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn row_groups_are_no_worse_than_flexllmgen_column_groups() {
    let config = CompressionConfig::DEFAULT;
    let n = 1024;
    let mut rng = Rng(3);
    let gaussian: Vec<f32> = (0..n * n).map(|_| rng.gaussian() * 0.02).collect();
    // Rows whose scales differ by up to 100x: grouping along a row keeps each group's range its own.
    let scaled: Vec<f32> = gaussian
        .chunks(n)
        .enumerate()
        .flat_map(|(r, row)| {
            let s = 100f32.powf((r * 37 % n) as f32 / (n - 1) as f32);
            row.iter().map(move |x| x * s)
        })
        .collect();
    // Gaussian data has no structure for either grouping to exploit: both MSEs agree to within the price of
    // strata's fp16 step being rounded up (coverage of [min, max]: ~2^-11 relative, ~0.05% in MSE).
    for (name, values, factor) in [("gaussian", &gaussian, 1.002), ("row-scaled", &scaled, 0.5)] {
        let ours = mse(
            values,
            &dequantize(&quantize(values, n, n, config).unwrap()),
        );
        let theirs = mse(
            values,
            &flexllmgen_dequantize(&flexllmgen_quantize(values, n, n, config).unwrap()),
        );
        eprintln!(
            "{name}: strata row groups MSE {ours:.4e}, FlexLLMGen column groups MSE {theirs:.4e}"
        );
        assert!(
            ours <= theirs * factor,
            "{name}: ours {ours} vs FlexLLMGen {theirs}"
        );
    }
}

#[test]
fn flexllmgen_scheme_groups_down_columns() {
    let config = CompressionConfig::DEFAULT;
    let mut rng = Rng(4);
    let (rows, cols) = (100, 7);
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.gaussian()).collect();
    let packed = flexllmgen_quantize(&values, rows, cols, config).unwrap();
    assert_eq!(packed.scales.len(), 2 * cols);
    let decoded = flexllmgen_dequantize(&packed);
    for c in 0..cols {
        for g in 0..2 {
            let members: Vec<usize> = (g * 64..((g + 1) * 64).min(rows))
                .map(|r| r * cols + c)
                .collect();
            let mn = members
                .iter()
                .map(|&i| values[i])
                .fold(f32::INFINITY, f32::min);
            let mx = members
                .iter()
                .map(|&i| values[i])
                .fold(f32::NEG_INFINITY, f32::max);
            for &i in &members {
                let err = (values[i] - decoded[i]).abs();
                assert!(
                    err <= (mx - mn) / 30.0 * 1.01 + f16_ulp(mn),
                    "column {c}: {err}"
                );
            }
        }
    }
}

#[test]
fn cache_rows_append_like_a_whole_tensor() {
    let config = CompressionConfig::DEFAULT;
    let mut rng = Rng(5);
    let head_dim = 80; // opt-2.7b: the second group is padded
    let rows = 3 * 4 * 5; // tokens x batch x heads
    let values: Vec<f32> = (0..rows * head_dim).map(|_| rng.gaussian()).collect();
    let whole = quantize_cache(&values, head_dim, config).unwrap();
    let mut cache = PackedTensor::zeros(rows + 20, head_dim, config).unwrap();
    for t in 0..3 {
        let step = &values[t * 20 * head_dim..(t + 1) * 20 * head_dim];
        cache.write_rows(t * 20, step).unwrap();
    }
    assert_eq!(cache.dequantize_rows(0, rows).unwrap(), dequantize(&whole));
    assert!(cache
        .dequantize_rows(rows, 20)
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
    // A block of rows is a tensor of its own that decodes to the same values.
    let block = whole.row_block(17, 30).unwrap();
    assert_eq!(dequantize(&block), whole.dequantize_rows(17, 30).unwrap());
    assert!(whole.row_block(40, 21).is_err());
    assert!(matches!(
        cache.write_rows(rows + 10, step_of(&values, head_dim, 11)),
        Err(CompressError::Rows { .. })
    ));
    assert_eq!(
        packed_cache_bytes(2, 4, 3, 5, head_dim, config),
        2 * 2 * packed_bytes(4 * 3 * 5, head_dim, config)
    );
}

fn step_of(values: &[f32], head_dim: usize, rows: usize) -> &[f32] {
    &values[..rows * head_dim]
}

#[test]
fn bad_inputs_are_errors_that_say_what_is_wrong() {
    let config = CompressionConfig::DEFAULT;
    let err = quantize(&[1.0; 10], 3, 4, config).unwrap_err();
    assert!(err.to_string().contains("expected 12 elements"), "{err}");
    let mut values = vec![0.5f32; 12];
    values[7] = f32::NAN;
    let err = quantize(&values, 3, 4, config).unwrap_err();
    assert!(err.to_string().contains("element (1, 3)"), "{err}");
    values[7] = 1e6;
    assert!(matches!(
        quantize(&values, 3, 4, config),
        Err(CompressError::Value { row: 1, col: 3, .. })
    ));
    let err = quantize(
        &[0.0; 4],
        1,
        4,
        CompressionConfig {
            bits: 5,
            group_size: 64,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("bits = 5"), "{err}");
    assert!(PackedTensor::from_words(2, 64, config, vec![0; 3]).is_err());
    // A shape from a corrupt header is an error, not an overflow or a huge allocation.
    let err = PackedTensor::from_words(usize::MAX / 2, 1 << 20, config, vec![]).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

fn sample_checkpoint() -> Vec<(String, StoredTensor)> {
    let mut rng = Rng(6);
    let mut out = Vec::new();
    for (name, rows, cols, bits, group) in [
        ("a.weight", 33, 100, 4u8, 64usize),
        ("b.weight", 8, 64, 8, 32),
    ] {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.gaussian()).collect();
        let config = CompressionConfig::new(bits, group).unwrap();
        out.push((
            name.to_owned(),
            StoredTensor::Packed(quantize(&values, rows, cols, config).unwrap()),
        ));
    }
    let bias: Vec<u8> = (0..100)
        .flat_map(|i| f16::from_f32(i as f32 * 0.1).to_le_bytes())
        .collect();
    out.push((
        "a.bias".to_owned(),
        StoredTensor::Dense(HostTensor {
            dtype: DType::F16,
            shape: vec![100],
            bytes: bias.into(),
        }),
    ));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn same(a: &[(String, StoredTensor)], b: &[(String, StoredTensor)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((na, ta), (nb, tb))| {
            na == nb
                && match (ta, tb) {
                    (StoredTensor::Packed(x), StoredTensor::Packed(y)) => x == y,
                    (StoredTensor::Dense(x), StoredTensor::Dense(y)) => {
                        x.dtype == y.dtype && x.shape == y.shape && x.bytes == y.bytes
                    }
                    _ => false,
                }
        })
}

#[test]
fn packed_checkpoints_round_trip_byte_exact() {
    let tensors = sample_checkpoint();
    let bytes = to_packed_bytes(&tensors).unwrap();
    let back = from_packed_bytes(&bytes).unwrap();
    assert!(same(&tensors, &back));
    assert!(
        to_packed_bytes(&back).unwrap() == bytes,
        "re-serialising changed the bytes"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.packed.safetensors");
    save_packed_file(&path, &tensors).unwrap();
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the file differs from the in-memory bytes"
    );
    assert!(same(&load_packed_file(&path).unwrap(), &tensors));
}

#[test]
fn foreign_or_future_files_are_refused() {
    let tensors = sample_checkpoint();
    let bytes = to_packed_bytes(&tensors).unwrap();
    // A plain safetensors file (no format metadata).
    let plain = safetensors::serialize(
        [(
            "x",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4])
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    let err = from_packed_bytes(&plain).unwrap_err().to_string();
    assert!(err.contains("not a strata packed checkpoint"), "{err}");
    // The same file claiming version 2: patch the header's version digit (same length keeps offsets valid).
    let needle = b"format_version\\\":1";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("version in the header");
    let mut future = bytes.clone();
    future[at + needle.len() - 1] = b'2';
    let err = from_packed_bytes(&future).unwrap_err().to_string();
    assert!(err.contains("reads version 1"), "{err}");
    assert!(from_packed_bytes(&bytes[..bytes.len() - 4]).is_err());
    let missing = load_packed_file(std::path::Path::new("/nonexistent/x.safetensors")).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/x.safetensors"));
}

/// An OPT of hidden width `h` with embeddings of width `proj`; a projected model is post-LN like opt-350m.
fn opt(name: &'static str, layers: usize, h: usize, heads: usize, proj: usize) -> OptConfig {
    OptConfig {
        word_embed_proj_dim: proj,
        do_layer_norm_before: proj == h,
        ..OptConfig::opt(name, layers, heads, h, 4 * h)
    }
}

#[test]
fn config_memory_formulas_match_packed_sizes_of_every_tensor() {
    let opt_125m = opt("opt-125m", 12, 768, 12, 768);
    let opt_350m = opt("opt-350m", 24, 1024, 16, 512);
    let opt_2_7b = opt("opt-2.7b", 32, 2560, 32, 2560);
    let galactica = OptConfig {
        enable_bias: false,
        layer_norm_elementwise_affine: false,
        activation: Activation::Gelu,
        ..opt("galactica-like", 4, 1024, 8, 1024)
    };
    let untied = OptConfig {
        tie_word_embeddings: false,
        dtype: DType::F32,
        ..opt_125m
    };
    for config in [opt_125m, opt_350m, opt_2_7b, galactica, untied] {
        for (bits, group) in [(4u8, 64usize), (8, 64), (2, 128), (4, 48)] {
            let c = CompressionConfig::new(bits, group).unwrap();
            let expected: u64 = model_tensors(&config)
                .iter()
                .map(|t| {
                    if t.role.is_compressed() {
                        assert_eq!(t.shape.len(), 2, "{}", t.name);
                        packed_bytes(t.shape[0], t.shape[1], c)
                    } else {
                        t.numel() as u64 * config.dtype.size_bytes()
                    }
                })
                .sum();
            assert_eq!(
                config.compressed_model_bytes(bits as u32, group as u64),
                expected,
                "{} {c:?}",
                config.name
            );
            assert_eq!(
                config.compressed_cache_bytes(3, 17, bits as u32, group as u64),
                packed_cache_bytes(
                    config.num_hidden_layers,
                    3,
                    17,
                    config.n_head,
                    config.head_dim(),
                    c
                )
            );
        }
    }
    // 4-bit groups of 64 take 36 bytes per 64 fp16 values (128 bytes): about 28% of the fp16 model.
    let ratio = opt_2_7b.compressed_model_bytes(4, 64) as f64 / opt_2_7b.model_bytes() as f64;
    assert!((0.281..0.285).contains(&ratio), "{ratio}");
    // Const-evaluable, like the other memory formulas.
    const OPT_125M_4BIT: u64 = OptConfig::packed_matrix_bytes(768, 768, 4, 64);
    assert_eq!(
        OPT_125M_4BIT,
        packed_bytes(768, 768, CompressionConfig::DEFAULT)
    );
}

/// Synthetic fp16 weights for any config: each tensor's values derive from its name.
struct SyntheticWeights {
    config: OptConfig,
    poison: Option<&'static str>,
}

impl WeightSource for SyntheticWeights {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let seed = spec
            .name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = Rng(seed);
        let mut values: Vec<f32> = (0..spec.numel()).map(|_| rng.gaussian() * 0.05).collect();
        if self.poison == Some(spec.name.as_str()) {
            values[3] = f32::INFINITY;
        }
        Ok(HostTensor {
            dtype: DType::F16,
            shape: spec.shape.clone(),
            bytes: values
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        })
    }
}

#[test]
fn whole_models_stream_into_a_packed_checkpoint() {
    let config = OptConfig {
        num_hidden_layers: 2,
        hidden_size: 32,
        n_head: 4,
        ffn_embed_dim: 48,
        word_embed_proj_dim: 16,
        vocab_size: 50,
        max_seq_len: 30,
        tie_word_embeddings: false,
        ..opt("tiny", 1, 32, 4, 16)
    };
    let source = SyntheticWeights {
        config,
        poison: None,
    };
    let packing = CompressionConfig::DEFAULT;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.packed.safetensors");
    let written = write_packed_model(&path, &source, packing).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), written);

    let file = PackedCheckpoint::open(&path).unwrap();
    let specs = model_tensors(&config);
    assert_eq!(file.names().len(), specs.len());
    let mut data_bytes = 0;
    for spec in &specs {
        let host = source.load(spec).unwrap();
        if spec.role.is_compressed() {
            let want = quantize(
                &host_tensor_to_f32(&host).unwrap(),
                spec.shape[0],
                spec.shape[1],
                packing,
            )
            .unwrap();
            let got = file.packed(&spec.name).unwrap();
            assert!(got.bytes == want.as_bytes(), "{}", spec.name);
            assert_eq!(got.layout, want.layout());
            data_bytes += got.bytes.len() as u64;
        } else {
            let StoredTensor::Dense(got) = file.tensor(&spec.name).unwrap() else {
                panic!("{} should be dense", spec.name);
            };
            assert_eq!(
                (got.dtype, &got.shape, &got.bytes),
                (host.dtype, &host.shape, &host.bytes)
            );
            data_bytes += got.bytes.len() as u64;
        }
    }
    // The data section is exactly what the config's formula predicts, and the safetensors reader accepts the file.
    assert_eq!(data_bytes, config.compressed_model_bytes(4, 64));
    assert_eq!(load_packed_file(&path).unwrap().len(), specs.len());
    assert!(file.packed("decoder.layers.0.fc1.bias").is_err());

    // A value that cannot be packed names its tensor, and leaves no file behind.
    let bad = SyntheticWeights {
        config,
        poison: Some("decoder.layers.1.fc2.weight"),
    };
    let bad_path = dir.path().join("bad.packed.safetensors");
    let err = write_packed_model(&bad_path, &bad, packing)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decoder.layers.1.fc2.weight") && err.contains("element (0, 3)"),
        "{err}"
    );
    assert!(!bad_path.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the good checkpoint remains: {left:?}");
}
