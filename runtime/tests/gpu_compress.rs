//! The GPU runtime's packed (compressed) paths against the CPU: linear layers over packed weights in row blocks
//! (GEMV and GEMM, bias, activation, accumulation, scattered output rows), packed embedding lookups, what a packed
//! model really occupies on the GPU, and the packed cache's kernels with f32 and f16 activations.

mod common;

use common::{
    gpu, gpu_with_binding, matrix, max_abs_diff, round_to, upload, upload_u32, LinearCase, Rng,
    EPILOGUES,
};
use strata_runtime::compress::{
    decode_attention, dequantize, packed_bytes, quantize, AttentionParams, AttentionShape,
    CompressionConfig, PackedTensor,
};
use strata_runtime::config::DType;
use strata_runtime::dummy::DummyWeights;
use strata_runtime::gpu::kernels::{
    decode_act, encode_act, Act, ActDtype, KernelOptions, Kernels, OutRows,
};
use strata_runtime::gpu::tensor::WeightFormat;
use strata_runtime::gpu::Gpu;
use strata_runtime::model::GpuModel;
use strata_runtime::reference;
use strata_runtime::weights::model_tensors;

/// A packed linear layer on the GPU against the CPU over the CPU-dequantised weight; returns the max difference.
fn check_linear(gpu: &Gpu, case: LinearCase, c: CompressionConfig) -> f32 {
    let LinearCase { m, k, n, .. } = case;
    let seed = m as u64 * 7919 + k as u64 * 31 + n as u64;
    case.max_diff(gpu, WeightFormat::Packed(c), seed, |w| {
        dequantize(&quantize(w, n, k, c).unwrap())
    })
}

#[test]
fn packed_linear_matches_cpu_in_row_blocks_for_gemv_and_gemm() {
    // 2 KiB bindings cut the larger weights into several packed row blocks; k = 70 and 33 pad their last group.
    for gpu in [gpu(), gpu_with_binding(2048)] {
        for (m, k, n) in [
            (1, 70, 65),
            (3, 64, 130),
            (8, 33, 17),
            (9, 70, 65),
            (67, 129, 131),
        ] {
            for c in [
                CompressionConfig::DEFAULT,
                CompressionConfig::new(4, 32).unwrap(),
                CompressionConfig::new(8, 64).unwrap(),
            ] {
                for epilogue @ (act, bias, acc) in EPILOGUES {
                    let diff = check_linear(&gpu, LinearCase::new((m, k, n), epilogue), c);
                    assert!(
                        diff < 1e-4 * k as f32,
                        "m={m} k={k} n={n} {c:?} {act:?} bias={bias} acc={acc}: {diff}"
                    );
                }
            }
        }
    }
}

#[test]
fn packed_linear_scatters_rows_into_a_cache_layout() {
    let gpu = gpu();
    let c = CompressionConfig::DEFAULT;
    let (batch, s_new, past, capacity, k, n) = (2, 3, 1, 6, 40, 24);
    let m = batch * s_new;
    let mut rng = Rng(5);
    let x = rng.vec(m * k, 1.0);
    let w = rng.vec(n * k, 1.0);
    let kernels = Kernels::new(&gpu);
    let wm = matrix(&gpu, &w, n, k, WeightFormat::Packed(c));
    let xb = upload(&gpu, &x);
    let out = upload(&gpu, &vec![0.0; batch * capacity * n]);
    let mut rec = kernels.recorder();
    rec.linear(
        &xb,
        m,
        &wm,
        None,
        Act::None,
        &out,
        OutRows::cache(s_new, past, capacity, n),
        false,
    );
    rec.submit();
    let got = gpu.read_f32(&out, 0, batch * capacity * n).unwrap();
    let want_rows = reference::matmul_t(&x, m, k, &dequantize(&quantize(&w, n, k, c).unwrap()), n);
    for b in 0..batch {
        for t in 0..capacity {
            let row = &got[(b * capacity + t) * n..][..n];
            if t >= past && t < past + s_new {
                let want = &want_rows[(b * s_new + t - past) * n..][..n];
                assert!(max_abs_diff(row, want) < 1e-4, "sequence {b} position {t}");
            } else {
                assert!(
                    row.iter().all(|v| *v == 0.0),
                    "sequence {b} position {t} was written"
                );
            }
        }
    }
}

#[test]
fn packed_gather_decodes_rows_by_id_and_accumulates() {
    let gpu = gpu();
    let c = CompressionConfig::DEFAULT;
    let (rows, cols) = (50, 100);
    let mut rng = Rng(9);
    let table = rng.vec(rows * cols, 2.0);
    let decoded = dequantize(&quantize(&table, rows, cols, c).unwrap());
    let ids: Vec<u32> = vec![3, 49, 0, 3, 17];
    let init = rng.vec(ids.len() * cols, 1.0);
    let kernels = Kernels::new(&gpu);
    let wm = matrix(&gpu, &table, rows, cols, WeightFormat::Packed(c));
    let idb = upload_u32(&gpu, &ids);
    let set = upload(&gpu, &init);
    let add = upload(&gpu, &init);
    let mut rec = kernels.recorder();
    rec.gather(&wm, &idb, ids.len(), &set, false);
    rec.gather(&wm, &idb, ids.len(), &add, true);
    rec.submit();
    let got_set = gpu.read_f32(&set, 0, ids.len() * cols).unwrap();
    let got_add = gpu.read_f32(&add, 0, ids.len() * cols).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let want = &decoded[id as usize * cols..][..cols];
        assert!(
            max_abs_diff(&got_set[t * cols..][..cols], want) < 1e-6,
            "id {id}"
        );
        let summed: Vec<f32> = want
            .iter()
            .zip(&init[t * cols..])
            .map(|(a, b)| a + b)
            .collect();
        assert!(
            max_abs_diff(&got_add[t * cols..][..cols], &summed) < 1e-5,
            "id {id} accumulated"
        );
    }
}

/// What a packed model occupies on the GPU: packed words for every matrix, f32 for biases and norms. Compared with
/// an independent sum over the config's tensor list and with `OptConfig::compressed_model_bytes` (which counts the
/// dense tensors at the checkpoint's dtype; the GPU keeps them as f32).
fn check_model_bytes(config: strata_runtime::OptConfig, c: CompressionConfig) -> (u64, u64) {
    let gpu = gpu();
    let source = DummyWeights::new(config);
    let model = GpuModel::upload_compressed(&gpu, &source, None, Some(c)).unwrap();
    let mut expected = 0u64;
    let mut dense_elements = 0u64;
    for spec in model_tensors(&config) {
        if spec.role.is_compressed() {
            expected += packed_bytes(spec.shape[0], spec.shape[1], c);
        } else {
            let n: usize = spec.shape.iter().product();
            expected += 4 * n as u64;
            dense_elements += n as u64;
        }
    }
    let on_gpu = model.gpu_bytes();
    assert_eq!(on_gpu, expected, "{}", config.name);
    let formula = config.compressed_model_bytes(c.bits as u32, c.group_size as u64);
    assert_eq!(
        on_gpu,
        formula + dense_elements * (4 - config.dtype.size_bytes()),
        "{}: the packed part differs from compressed_model_bytes",
        config.name
    );
    let uncompressed = model_tensors(&config)
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64 * config.dtype.size_bytes())
        .sum::<u64>();
    eprintln!(
        "{}: {on_gpu} bytes on the GPU with 4-bit/{} weights (compressed_model_bytes {formula}, dense {dense_elements} \
         f32 elements; uncompressed {uncompressed} bytes at {:?})",
        config.name, c.group_size, config.dtype
    );
    (on_gpu, formula)
}

#[test]
fn packed_model_bytes_on_the_gpu_match_the_formula() {
    check_model_bytes(common::tiny_config(), CompressionConfig::DEFAULT);
    check_model_bytes(
        common::tiny_config(),
        CompressionConfig::new(4, 32).unwrap(),
    );
    // opt-125m's shape (Hugging Face's config), with dummy weights.
    let opt125m = strata_runtime::OptConfig::opt("opt-125m", 12, 12, 768, 3072);
    let (on_gpu, formula) = check_model_bytes(opt125m, CompressionConfig::DEFAULT);
    // The packed model is about a quarter of the fp16 one.
    assert!(on_gpu < opt125m.model_bytes() / 3, "{on_gpu} vs {formula}");
}

/// The packed cache's kernels through the recorder with f32 and with f16 activations: q4_quantize packs rows of
/// activations (past one dispatch's grid, so a later piece goes through act-sized staging), q4_dequant decodes them
/// into activations, q4_attention reads an activation query and writes an activation output. Each against the CPU
/// on the same (act-rounded) inputs.
#[test]
fn packed_cache_kernels_read_and_write_activations_in_both_dtypes() {
    let gpu = gpu();
    let c = CompressionConfig::new(4, 16).unwrap();
    // 65,540 rows: the last 5 rows are a second piece through the kernels' staging.
    let (rows, cols) = (65_540, 16);
    let mut rng = Rng(31);
    let values = rng.vec(rows * cols, 2.0);
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = Kernels::with_options(&gpu, KernelOptions::default().with_act(act));
        if kernels.act() != act {
            eprintln!("skipped {act:?}: this adapter has no SHADER_F16");
            continue;
        }
        let dtype = match act {
            ActDtype::F32 => DType::F32,
            ActDtype::F16 => DType::F16,
        };
        let seen = round_to(&values, dtype);
        let cpu = quantize(&seen, rows, cols, c).unwrap();
        let layout = cpu.layout();
        let input = gpu
            .storage_buffer_init("rows", &encode_act(&values, act))
            .unwrap();
        let packed = gpu
            .storage_buffer_init("packed", &vec![0u8; cpu.as_bytes().len()])
            .unwrap();
        let decoded = gpu
            .storage_buffer_init("decoded", &vec![0u8; rows * cols * act.bytes()])
            .unwrap();
        let mut rec = kernels.recorder();
        rec.quantize_rows(&input, rows, &packed, layout, c, 0, 1);
        rec.dequantize_rows(&packed, layout, c, rows, &decoded);
        rec.submit();
        let back = gpu
            .read_back(&[
                (&packed, 0, packed.size()),
                (&decoded, 0, (rows * cols * act.bytes()) as u64),
            ])
            .unwrap();
        let ours = PackedTensor::from_bytes(rows, cols, c, &back[0]).unwrap();
        let (got, want) = (dequantize(&ours), dequantize(&cpu));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (step, _) = cpu.group_params(i / cols, (i % cols) / 16);
            assert!(
                (g - w).abs() <= step * 1.01 + 1e-7,
                "{act:?}: packed value {i}: gpu {g} cpu {w}"
            );
        }
        // q4_dequant writes exactly the packed values, rounded to the activations.
        let decoded = decode_act(&back[1], act);
        assert_eq!(decoded, round_to(&got, dtype), "{act:?}: decoded rows");

        // Decode attention over a packed cache of 3 sequences x 2 heads x 9 positions (head_dim 16).
        let (batch, heads, seq_len) = (3, 2, 9);
        let shape = AttentionShape {
            batch,
            heads,
            head_dim: cols,
            seq_len,
            token_stride: 1,
            bh_stride: seq_len,
        };
        let n = batch * heads * seq_len;
        let k = quantize(&rng.vec(n * cols, 1.0), n, cols, c).unwrap();
        let v = quantize(&rng.vec(n * cols, 1.0), n, cols, c).unwrap();
        let query = round_to(&rng.vec(batch * heads * cols, 1.0), dtype);
        let mask: Vec<u32> = (0..batch * seq_len)
            .map(|i| (i % seq_len >= i / seq_len) as u32)
            .collect();
        let scale = (cols as f32).powf(-0.5);
        let want = decode_attention(&query, &k, &v, &shape, Some((&mask, seq_len)), scale).unwrap();
        let params = AttentionParams::new(&shape, &k, &v, Some(seq_len), scale).unwrap();
        let qb = gpu
            .storage_buffer_init("q", &encode_act(&query, act))
            .unwrap();
        let (kb, vb) = (
            gpu.storage_buffer_init("k", k.as_bytes()).unwrap(),
            gpu.storage_buffer_init("v", v.as_bytes()).unwrap(),
        );
        let mb = upload_u32(&gpu, &mask);
        let scores = upload(&gpu, &vec![0.0; n]);
        let out = gpu
            .storage_buffer_init("out", &encode_act(&vec![f32::NAN; query.len()], act))
            .unwrap();
        let mut rec = kernels.recorder();
        rec.packed_attention(&qb, &kb, &vb, &mb, &scores, &out, c, params);
        rec.submit();
        let bytes = gpu.read_back(&[(&out, 0, out.size())]).unwrap();
        let got = decode_act(&bytes[0][..query.len() * act.bytes()], act);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // f16 output: within half an f16 ulp of the f32 result, plus f32 summation order.
            let tol = match act {
                ActDtype::F32 => 1e-5,
                ActDtype::F16 => 1e-5 + w.abs() / 2048.0,
            };
            assert!(
                (g - w).abs() <= tol,
                "{act:?}: attention output {i}: gpu {g} cpu {w}"
            );
        }
    }
}
