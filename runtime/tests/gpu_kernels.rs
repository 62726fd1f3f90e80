//! Each GPU kernel against the CPU reference, on whatever adapter is present (lavapipe on CPU machines); attention's
//! are in gpu_attention.rs.

mod common;

use common::{
    gpu, gpu_with_binding, matrix, max_abs_diff, read_u32, round_to, upload, upload_u32,
    LinearCase, Rng, EPILOGUES,
};
use strata_runtime::config::DType;
use strata_runtime::gpu::kernels::{Act, Kernels, OutRows};
use strata_runtime::gpu::tensor::WeightFormat;
use strata_runtime::gpu::Gpu;
use strata_runtime::reference;

fn dtype_of(format: WeightFormat) -> DType {
    match format {
        WeightFormat::F32 | WeightFormat::Packed(_) => DType::F32,
        WeightFormat::F16 => DType::F16,
    }
}

/// Runs one linear layer on the GPU and on the CPU (over the weight rounded to the format); returns the max
/// difference.
fn check_linear(gpu: &Gpu, case: LinearCase, format: WeightFormat) -> f32 {
    let seed = case.m as u64 * 1000 + case.k as u64 * 10 + case.n as u64;
    case.max_diff(gpu, format, seed, |w| round_to(w, dtype_of(format)))
}

#[test]
fn linear_matches_cpu_for_odd_shapes_both_formats_and_both_kernels() {
    let gpu = gpu();
    // m <= 8 takes the GEMV kernel, larger m the tiled GEMM; none of these is a multiple of the tiles.
    let shapes = [
        (1, 7, 5),
        (3, 64, 130),
        (8, 33, 17),
        (9, 70, 65),
        (67, 129, 131),
        (130, 16, 64),
    ];
    for (m, k, n) in shapes {
        for format in [WeightFormat::F32, WeightFormat::F16] {
            for epilogue @ (act, _, _) in EPILOGUES {
                let diff = check_linear(&gpu, LinearCase::new((m, k, n), epilogue), format);
                // Inputs are O(1) and sums run over k terms: f32 accumulation error stays far below 1e-3.
                assert!(
                    diff < 1e-3 * (k as f32).sqrt(),
                    "m={m} k={k} n={n} {format:?} {act:?}: diff {diff}"
                );
            }
        }
    }
}

#[test]
fn linear_works_on_row_chunked_weights() {
    // 1 KiB bindings: a 70 x 33 f32 matrix (9.2 KB) becomes 10 chunks of 7 rows; f16 5 chunks of 15.
    let gpu = gpu_with_binding(1024);
    for format in [WeightFormat::F32, WeightFormat::F16] {
        let w = vec![0.5; 70 * 33];
        let wm = matrix(&gpu, &w, 70, 33, format);
        assert!(wm.chunks.len() > 1, "{format:?} should be chunked");
        assert_eq!(wm.chunks.iter().map(|c| c.rows).sum::<usize>(), 70);
        for (m, k, n) in [(2, 33, 70), (20, 33, 70)] {
            let case = LinearCase::new((m, k, n), (Act::Relu, true, false));
            let diff = check_linear(&gpu, case, format);
            assert!(diff < 1e-3, "chunked {format:?} m={m}: diff {diff}");
        }
    }
}

#[test]
fn gelu_matches_exact_erf_gelu() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let n = 4001;
    let xs: Vec<f32> = (0..n)
        .map(|i| -8.0 + 16.0 * i as f32 / (n - 1) as f32)
        .collect();
    // x @ [1]^T with the GELU epilogue, k = 1: the output is gelu(x) exactly as the kernel computes it.
    let one = matrix(&gpu, &[1.0], 1, 1, WeightFormat::F32);
    let (xb, out) = (upload(&gpu, &xs), upload(&gpu, &vec![0.0; n]));
    let mut rec = kernels.recorder();
    rec.linear(
        &xb,
        n,
        &one,
        None,
        Act::Gelu,
        &out,
        OutRows::dense(1, 0),
        false,
    );
    rec.submit();
    let got = gpu.read_f32(&out, 0, n).unwrap();
    let worst = xs
        .iter()
        .zip(&got)
        .map(|(&x, &g)| (g - reference::gelu(x)).abs() / x.abs().max(1.0))
        .fold(0.0, f32::max);
    assert!(worst < 1e-6, "GELU error {worst} (relative to max(1, |x|))");
    // The reference's erf itself: erf(0.5) and erf(2) to 1e-12.
    assert!((reference::erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-12);
    assert!((reference::erf(2.0) - 0.995_322_265_018_952_7).abs() < 1e-12);
    assert!((reference::erf(3.5) - 0.999_999_256_901_628).abs() < 1e-12);
}

#[test]
fn layer_norm_matches_cpu_with_and_without_affine() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    for width in [7, 256, 1000] {
        let rows = 5;
        let mut rng = Rng(width as u64);
        // An offset mean checks the two-pass variance.
        let x: Vec<f32> = rng
            .vec(rows * width, 2.0)
            .into_iter()
            .map(|v| v + 30.0)
            .collect();
        let g = rng.vec(width, 1.0);
        let b = rng.vec(width, 1.0);
        let (xb, gb, bb, out) = (
            upload(&gpu, &x),
            upload(&gpu, &g),
            upload(&gpu, &b),
            upload(&gpu, &vec![0.0; rows * width]),
        );
        for affine in [false, true] {
            let mut rec = kernels.recorder();
            rec.layer_norm(&xb, rows, width, affine.then_some((&gb, &bb)), 1e-5, &out);
            rec.submit();
            let got = gpu.read_f32(&out, 0, rows * width).unwrap();
            let want = reference::layer_norm(&x, width, affine.then_some((&g[..], &b[..])), 1e-5);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "width {width} affine {affine}: diff {diff}");
        }
    }
}

#[test]
fn gather_reads_rows_across_chunks_and_accumulates() {
    let gpu = gpu_with_binding(256);
    let kernels = Kernels::new(&gpu);
    let (rows, cols) = (37, 10);
    let table: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25).collect();
    for format in [WeightFormat::F32, WeightFormat::F16] {
        let tm = matrix(&gpu, &table, rows, cols, format);
        assert!(tm.chunks.len() > 2);
        let ids = [36u32, 0, 5, 17, 36];
        let idb = upload_u32(&gpu, &ids);
        let out = upload(&gpu, &vec![1.0; ids.len() * cols]);
        let mut rec = kernels.recorder();
        rec.gather(&tm, &idb, ids.len(), &out, true);
        rec.submit();
        let got = gpu.read_f32(&out, 0, ids.len() * cols).unwrap();
        let table_seen = round_to(&table, dtype_of(format));
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&id| {
                table_seen[id as usize * cols..(id as usize + 1) * cols]
                    .iter()
                    .map(|v| v + 1.0)
            })
            .collect();
        assert_eq!(got, want, "{format:?}");
    }
}

#[test]
fn argmax_prefers_the_lowest_id_on_ties() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let vocab = 1003;
    let mut rng = Rng(3);
    let mut logits = rng.vec(3 * vocab, 1.0);
    logits[700] = 5.0;
    logits[900] = 5.0; // tie in row 0: 700 wins
    logits[vocab + 1002] = 9.0; // last id
    logits[2 * vocab + 12] = f32::NAN; // NaN never wins
    logits[2 * vocab + 13] = 3.0;
    let lb = upload(&gpu, &logits);
    let next = gpu.storage_buffer("next", 12);
    let mut rec = kernels.recorder();
    rec.argmax(&lb, 3, vocab, &next);
    rec.submit();
    assert_eq!(read_u32(&gpu, &next, 3), vec![700, 1002, 13]);
}

#[allow(clippy::too_many_arguments)] // the sampler's parameters plus the device
fn sample(
    gpu: &Gpu,
    kernels: &Kernels,
    logits: &[f32],
    rows: usize,
    temperature: f32,
    top_p: f32,
    seed: u32,
    step: u32,
) -> Vec<u32> {
    let vocab = logits.len() / rows;
    let lb = upload(gpu, logits);
    let next = gpu.storage_buffer("next", 4 * rows as u64);
    let mut rec = kernels.recorder();
    rec.sample(&lb, rows, vocab, temperature, top_p, seed, step, &next);
    rec.submit();
    read_u32(gpu, &next, rows)
}

#[test]
fn sampling_stays_in_the_nucleus_and_is_reproducible() {
    let gpu = gpu();
    let kernels = Kernels::new(&gpu);
    let (rows, vocab) = (64, 500);
    let mut rng = Rng(11);
    let logits = rng.vec(rows * vocab, 4.0);
    // A tiny nucleus keeps only the most likely token.
    let greedy = sample(&gpu, &kernels, &logits, rows, 1.0, 1e-6, 1, 0);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let best = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(greedy[r] as usize, best, "row {r}");
    }
    // top_p = 0.5: every draw is inside the CPU-computed nucleus; draws vary across rows and seeds.
    let top_p = 0.5;
    let a = sample(&gpu, &kernels, &logits, rows, 0.7, top_p, 42, 3);
    let b = sample(&gpu, &kernels, &logits, rows, 0.7, top_p, 42, 3);
    let c = sample(&gpu, &kernels, &logits, rows, 0.7, top_p, 43, 3);
    assert_eq!(a, b, "same seed and step must give the same tokens");
    assert_ne!(a, c, "a different seed should change some of 64 draws");
    let mut not_greedy = 0;
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let mut p: Vec<(f64, usize)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) as f64 / 0.7).exp(), i))
            .collect();
        let z: f64 = p.iter().map(|x| x.0).sum();
        p.sort_by(|x, y| y.0.total_cmp(&x.0));
        let mut mass = 0.0;
        let mut nucleus = Vec::new();
        for &(pi, i) in &p {
            nucleus.push(i);
            mass += pi / z;
            if mass >= top_p as f64 {
                break;
            }
        }
        assert!(
            nucleus.contains(&(a[r] as usize)),
            "row {r}: token {} outside the nucleus {nucleus:?}",
            a[r]
        );
        not_greedy += (a[r] != greedy[r]) as usize;
    }
    assert!(not_greedy > 0, "sampling never left the argmax in 64 rows");
}
