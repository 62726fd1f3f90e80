//! Every linear kernel and variant against a CPU reference: awkward shapes (m = 1 .. 130 around the GEMV / decode /
//! prefill boundaries, k and n off every tile and vector width, split-K), f32 / f16 / packed 2-4-8-bit weights, f32
//! and f16 activations, bias / activation / residual epilogues, KV-cache row placement, row-chunked weights, f32
//! logits from f16 activations; gather and layer norm over f16 activations; the variant report and self-check;
//! the benchmark entry. The tensor-core variant runs where the adapter has it and says it was skipped elsewhere.

mod common;

use common::{gpu, gpu_with_binding, matrix, round_to, upload_u32, Rng};
use strata_runtime::compress::{dequantize, quantize, CompressionConfig};
use strata_runtime::config::DType;
use strata_runtime::gpu::kernels::{
    bench_linear, decode_act, encode_act, split_k, split_k_scratch_bytes, staging_buffer_bytes,
    Act, ActDtype, Choice, Family, KernelOptions, Kernels, LinearCall, LinearKernel, LinearShape,
    OutRows, TileConfig, Variant, GEMV_MAX_ROWS,
};
use strata_runtime::gpu::tensor::WeightFormat;
use strata_runtime::gpu::Gpu;
use strata_runtime::reference;

const ROWS: [usize; 7] = [1, 7, 9, 63, 64, 65, 130];
/// (k, n): unaligned k; aligned; n below one column tile; split-K shapes (few column tiles, long k), one unaligned.
const SHAPES: [(usize, usize); 5] = [(33, 70), (64, 130), (300, 17), (1024, 40), (1030, 24)];

fn formats() -> [WeightFormat; 5] {
    let packed = |bits, group| WeightFormat::Packed(CompressionConfig::new(bits, group).unwrap());
    [
        WeightFormat::F32,
        WeightFormat::F16,
        packed(2, 32),
        packed(4, 64),
        packed(8, 64),
    ]
}

/// Two of the five formats for the `i`-th case: consecutive cases rotate through them, so each row count meets
/// every format over the five shapes (the full product would take 2.5 times as long on a CPU driver).
fn two_formats(i: usize) -> [WeightFormat; 2] {
    let f = formats();
    [f[(2 * i) % 5], f[(2 * i + 1) % 5]]
}

/// The weight as the GPU holds it.
fn seen(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Vec<f32> {
    match format {
        WeightFormat::F32 => w.to_vec(),
        WeightFormat::F16 => round_to(w, DType::F16),
        WeightFormat::Packed(c) => dequantize(&quantize(w, n, k, c).unwrap()),
    }
}

/// One linear layer: shape, weight format, epilogue and output placement.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    k: usize,
    n: usize,
    format: WeightFormat,
    act: Act,
    bias: bool,
    accumulate: bool,
    /// `Some((rows per sequence, past, capacity))`: rows scattered into a KV-cache layout.
    cache: Option<(usize, usize, usize)>,
    /// The output's dtype when it is not the activations'.
    out: Option<ActDtype>,
    /// A kernel forced (tile configuration included).
    kernel: Option<LinearKernel>,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, format: WeightFormat, i: usize) -> Case {
        let (act, bias, accumulate) = [
            (Act::None, false, false),
            (Act::Relu, true, false),
            (Act::Gelu, true, true),
        ][i % 3];
        Case {
            m,
            k,
            n,
            format,
            act,
            bias,
            accumulate,
            cache: None,
            out: None,
            kernel: None,
        }
    }

    fn out_rows(&self) -> (OutRows, usize) {
        match self.cache {
            Some((per_seq, past, capacity)) => (
                OutRows::cache(per_seq, past, capacity, self.n),
                self.m.div_ceil(per_seq) * capacity * self.n,
            ),
            None => (OutRows::dense(self.n, 0), self.m * self.n),
        }
    }

    /// Output element index of (row r, column c).
    fn index(&self, r: usize, c: usize) -> usize {
        match self.cache {
            Some((per_seq, past, capacity)) => {
                ((r / per_seq) * capacity + r % per_seq + past) * self.n + c
            }
            None => r * self.n + c,
        }
    }

    /// Runs the case on `kernels` with `variant` forced (`None`: the kernels' choice) and checks every output
    /// element (and that nothing else was written) against the CPU; returns the kernel that ran.
    fn check(&self, gpu: &Gpu, kernels: &Kernels, variant: Option<Variant>) -> LinearKernel {
        let Case {
            m, k, n, format, ..
        } = *self;
        let act = kernels.act();
        let out_dtype = self.out.unwrap_or(act);
        let mut rng = Rng((m * 7919 + k * 131 + n) as u64);
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let b = rng.vec(n, 1.0);
        let (rows, out_len) = self.out_rows();
        let init = rng.vec(out_len, 1.0);
        let wm = matrix(gpu, &w, n, k, format);
        let xb = gpu.storage_buffer_init("x", &encode_act(&x, act)).unwrap();
        let bb = gpu
            .storage_buffer_init("bias", bytemuck::cast_slice(&b))
            .unwrap();
        let out = gpu
            .storage_buffer_init("out", &encode_act(&init, out_dtype))
            .unwrap();
        let mut rec = kernels.recorder();
        rec.linear_call(LinearCall {
            x: &xb,
            m,
            w: &wm,
            bias: self.bias.then_some(&bb),
            act: self.act,
            out: &out,
            rows,
            accumulate: self.accumulate,
            out_dtype: self.out,
            variant,
            kernel: self.kernel,
        });
        rec.submit();
        let bytes = gpu
            .read_back(&[(
                &out,
                0,
                (out_len * out_dtype.bytes()).next_multiple_of(4) as u64,
            )])
            .unwrap();
        let mut got = decode_act(&bytes[0], out_dtype);
        got.truncate(out_len);

        // The CPU over what the GPU reads: x and the old output in their storage dtype, the weight as stored.
        let round = |v: &[f32], d: ActDtype| match d {
            ActDtype::F32 => v.to_vec(),
            ActDtype::F16 => round_to(v, DType::F16),
        };
        let xs = round(&x, act);
        let init_seen = round(&init, out_dtype);
        let ws = seen(&w, n, k, format);
        let dots = reference::matmul_t(&xs, m, k, &ws, n);
        let kernel = self
            .kernel
            .unwrap_or_else(|| kernels.linear_kernel(m, n, format, variant));
        // f16 inputs (tensor cores round x), f16 outputs: a few f16 ulps of the terms' magnitude; f32: summation
        // order only.
        let coarse = act == ActDtype::F16
            || out_dtype == ActDtype::F16
            || kernel.variant() == Variant::CoopMatrix;
        let rel = if coarse { 2e-3 } else { 2e-5 };
        let mut want = init_seen.clone();
        for r in 0..m {
            for c in 0..n {
                let mut v = dots[r * n + c] + if self.bias { b[c] } else { 0.0 };
                v = match self.act {
                    Act::None => v,
                    Act::Relu => v.max(0.0),
                    Act::Gelu => reference::gelu(v),
                };
                let i = self.index(r, c);
                let magnitude: f32 = (0..k)
                    .map(|j| (xs[r * k + j] * ws[c * k + j]).abs())
                    .sum::<f32>()
                    + b[c].abs()
                    + init_seen[i].abs();
                want[i] = v + if self.accumulate { init_seen[i] } else { 0.0 };
                let bound = rel * (magnitude + want[i].abs()) + 1e-5;
                assert!(
                    (got[i] - want[i]).abs() <= bound,
                    "{self:?} {variant:?} ({kernel}) {act:?}: output ({r}, {c}) is {}, want {} (bound {bound})",
                    got[i],
                    want[i]
                );
            }
        }
        // Elements no output row maps to keep their old values.
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if self.cache.is_some() && w == init_seen[i] {
                assert_eq!(
                    g, w,
                    "{self:?}: element {i} outside the new rows was written"
                );
            }
        }
        kernel
    }
}

fn kernels_with(gpu: &Gpu, act: ActDtype, choice: Choice) -> Kernels {
    Kernels::with_options(
        gpu,
        KernelOptions {
            act,
            tiled: choice,
            gemv: choice,
            from_env: false,
        },
    )
}

/// The portable kernels: the GEMV for m <= 8, decode tiles with split-K for 9..=64, prefill tiles above; every
/// format, both activation dtypes.
#[test]
fn portable_linear_kernels_match_the_cpu() {
    let gpu = gpu();
    let mut seen_kernels = Vec::new();
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = kernels_with(&gpu, act, Choice::Portable);
        let mut i = 0;
        for m in ROWS {
            for (k, n) in SHAPES {
                for format in two_formats(i) {
                    let kernel = Case::new(m, k, n, format, i).check(
                        &gpu,
                        &kernels,
                        Some(Variant::Portable),
                    );
                    assert_eq!(kernel.variant(), Variant::Portable);
                    seen_kernels.push((m, kernel));
                    i += 1;
                }
            }
        }
    }
    // Each row count ran the kernel its range calls for.
    for (m, kernel) in seen_kernels {
        match kernel {
            LinearKernel::Gemv { rows, .. } => assert!(m <= GEMV_MAX_ROWS && rows as usize == m),
            LinearKernel::Tiled(t) => assert!(m > GEMV_MAX_ROWS && (m > 64 || t.bm as usize >= m)),
            LinearKernel::Coop(_) => unreachable!("forced portable"),
        }
    }
}

/// The GEMV's subgroup reduction, forced (CPU adapters do not choose it themselves), where the adapter has
/// subgroups.
#[test]
fn subgroup_gemv_matches_the_cpu() {
    let gpu = gpu();
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = kernels_with(&gpu, act, Choice::Device);
        if let Err(why) = kernels.variant_available(Variant::Subgroup) {
            eprintln!(
                "skipped: subgroup GEMV unavailable on {}: {why}",
                gpu.describe()
            );
            return;
        }
        let mut i = 0;
        for m in [1, 3, 7, GEMV_MAX_ROWS] {
            for (k, n) in SHAPES {
                for format in two_formats(i) {
                    let kernel = Case::new(m, k, n, format, i).check(
                        &gpu,
                        &kernels,
                        Some(Variant::Subgroup),
                    );
                    assert_eq!(kernel.variant(), Variant::Subgroup);
                    i += 1;
                }
            }
        }
    }
}

/// The tensor-core kernel where the adapter has cooperative matrices (f16 and packed weights; f32 weights stay
/// portable); skipped, saying so, elsewhere.
#[test]
fn coop_matrix_linear_matches_the_cpu_where_present() {
    let gpu = gpu();
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = kernels_with(&gpu, act, Choice::Device);
        if let Err(why) = kernels.variant_available(Variant::CoopMatrix) {
            eprintln!(
                "skipped: no tensor-core kernel on {}: {why}",
                gpu.describe()
            );
            return;
        }
        let mut i = 0;
        for m in ROWS {
            for (k, n) in SHAPES {
                for format in two_formats(i) {
                    let case = Case::new(m, k, n, format, i);
                    let kernel = case.check(&gpu, &kernels, Some(Variant::CoopMatrix));
                    // f32 weights keep f32 arithmetic: the portable tiled kernel.
                    let expected = if format == WeightFormat::F32 {
                        Variant::Portable
                    } else {
                        Variant::CoopMatrix
                    };
                    assert_eq!(kernel.variant(), expected, "{case:?}");
                    // The kernels' own choice: the GEMV family's variant for m <= 8, tensor cores beyond.
                    let own = case.check(&gpu, &kernels, None);
                    let expected = if m <= GEMV_MAX_ROWS {
                        kernels.family_choice(Family::Gemv).variant
                    } else {
                        expected
                    };
                    assert_eq!(own.variant(), expected, "{case:?}");
                    i += 1;
                }
            }
        }
        println!("{}", kernels.variants());
    }
}

/// Every tiled configuration the kernels may pick on some device, forced where this device can run it (the
/// 8 x 8-per-thread ones, and the small-memory decode tiles, are otherwise never this device's choice).
#[test]
fn every_tile_configuration_matches_the_cpu() {
    let gpu = gpu();
    let kernels = kernels_with(&gpu, ActDtype::F32, Choice::Portable);
    let mut configs = vec![
        TileConfig::LARGE,
        TileConfig::SMALL,
        TileConfig::SMALL_LOW_MEMORY,
    ];
    for m in [16, 32, 64] {
        configs.push(TileConfig::decode(m, false));
        configs.push(TileConfig::decode(m, true));
    }
    for (i, t) in configs.into_iter().enumerate() {
        let kernel = LinearKernel::Tiled(t);
        // One row count the tile holds, one it does not (prefill tiles) or that splits k (decode tiles).
        let rows = if t.bn == 64 && t.bm <= 64 && t.bk < 16 || t.bm < 64 {
            [t.bm as usize, t.bm as usize / 2 + 1]
        } else {
            [t.bm as usize + 3, 9]
        };
        for m in rows {
            if !kernels.can_run(kernel, m) {
                eprintln!("skipped: {kernel} does not fit {}", gpu.describe());
                continue;
            }
            for (k, n) in [(37, 70), (600, 24)] {
                let format = two_formats(i)[m % 2];
                let case = Case {
                    kernel: Some(kernel),
                    ..Case::new(m, k, n, format, i)
                };
                assert_eq!(case.check(&gpu, &kernels, None), kernel);
            }
        }
    }
}

/// Decode batches of 9..=64 rows with long k split the k range into several workgroups' partial sums; the sum
/// pass applies the epilogue, and the scratch held is the formula's size.
#[test]
fn split_k_decode_matches_the_cpu_and_its_scratch_formula() {
    let gpu = gpu();
    let kernels = kernels_with(&gpu, ActDtype::F32, Choice::Portable);
    for (m, k, n) in [(9, 1024, 40), (33, 2048, 100), (64, 1030, 24)] {
        let s = split_k(m, n, k);
        assert!(s.splits > 1, "m={m} k={k} n={n} should split: {s:?}");
        assert_eq!(s.k_split % 64, 0);
        assert!((s.splits - 1) * s.k_split < k && s.splits * s.k_split >= k);
        for (i, format) in formats().into_iter().enumerate() {
            Case::new(m, k, n, format, i).check(&gpu, &kernels, None);
        }
    }
    // No split for the GEMV's rows, prefill, or columns enough to fill the GPU.
    assert_eq!(split_k(8, 40, 4096).splits, 1);
    assert_eq!(split_k(65, 40, 4096).splits, 1);
    assert_eq!(split_k(64, 4096 * 16, 4096).splits, 1);
    assert_eq!(split_k_scratch_bytes(64, 4096 * 16, 4096), 0);
    let expected = [(9, 1024, 40), (33, 2048, 100), (64, 1030, 24)]
        .iter()
        .map(|&(m, k, n)| split_k_scratch_bytes(m, n, k))
        .max()
        .unwrap();
    // The scratch is the kernels' staging slot, which rounds a request up to a power of two.
    assert_eq!(
        kernels.scratch_bytes(),
        staging_buffer_bytes(expected, gpu.max_binding())
    );
}

/// Output rows scattered into a KV-cache layout (`OutRows::cache`), for every kernel and both activation dtypes;
/// rows outside the new ones are left alone.
#[test]
fn linear_rows_land_in_a_cache_layout() {
    let gpu = gpu();
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = kernels_with(&gpu, act, Choice::Portable);
        // (sequences, new rows per sequence): GEMV, decode tile, prefill tile.
        for (i, (batch, per_seq)) in [(3, 1), (2, 3), (5, 4), (3, 30)].into_iter().enumerate() {
            for format in [WeightFormat::F16, formats()[3]] {
                let case = Case {
                    cache: Some((per_seq, 2, per_seq + 3)),
                    ..Case::new(batch * per_seq, 64, 24, format, i)
                };
                case.check(&gpu, &kernels, None);
            }
        }
    }
}

/// Weights in row chunks (bindings capped at 512 bytes): every kernel loops over chunks, writing each chunk's
/// columns.
#[test]
fn linear_works_on_row_chunked_weights_for_every_kernel() {
    let gpu = gpu_with_binding(512);
    for act in [ActDtype::F32, ActDtype::F16] {
        let kernels = kernels_with(&gpu, act, Choice::Portable);
        for (i, m) in [3, 20, 70].into_iter().enumerate() {
            for format in formats() {
                let w = matrix(&gpu, &vec![0.5; 70 * 40], 70, 40, format);
                assert!(w.chunks.len() > 1, "{format:?} should be chunked");
                Case::new(m, 40, 70, format, i).check(&gpu, &kernels, None);
            }
        }
    }
}

/// The logits projection writes f32 while its input is f16; a K or V projection writes an f16 cache's rows
/// directly while its input is f32.
#[test]
fn linear_output_dtype_can_differ_from_the_activations() {
    let gpu = gpu();
    for (act, out) in [
        (ActDtype::F16, ActDtype::F32),
        (ActDtype::F32, ActDtype::F16),
    ] {
        let kernels = kernels_with(&gpu, act, Choice::Portable);
        // Two sequences of p new rows each: the GEMV, a decode tile and a prefill tile.
        for (i, p) in [1usize, 2, 6, 35].into_iter().enumerate() {
            for format in [WeightFormat::F16, formats()[3]] {
                let case = Case {
                    out: Some(out),
                    cache: (out == ActDtype::F16).then_some((p, 1, p + 2)),
                    ..Case::new(2 * p, 64, 61, format, i)
                };
                case.check(&gpu, &kernels, None);
            }
        }
    }
}

/// Embedding rows gathered into f16 activations (f32, f16 and packed tables, across row chunks) and layer norm
/// over f16 activations, against the CPU.
#[test]
fn gather_and_layer_norm_work_on_f16_activations() {
    let gpu = gpu_with_binding(512);
    let kernels = kernels_with(&gpu, ActDtype::F16, Choice::Portable);
    let (rows, cols) = (37, 64);
    let mut rng = Rng(17);
    let table = rng.vec(rows * cols, 2.0);
    let ids = [36u32, 0, 5, 17, 36];
    let idb = upload_u32(&gpu, &ids);
    for format in formats() {
        let tm = matrix(&gpu, &table, rows, cols, format);
        assert!(tm.chunks.len() > 1, "{format:?} should be chunked");
        let init = rng.vec(ids.len() * cols, 1.0);
        let out = gpu
            .storage_buffer_init("out", &encode_act(&init, ActDtype::F16))
            .unwrap();
        let mut rec = kernels.recorder();
        rec.gather(&tm, &idb, ids.len(), &out, true);
        rec.submit();
        let got = decode_act(
            &gpu.read_back(&[(&out, 0, (ids.len() * cols * 2) as u64)])
                .unwrap()[0],
            ActDtype::F16,
        );
        let table_seen = seen(&table, rows, cols, format);
        let init_seen = round_to(&init, DType::F16);
        for (t, &id) in ids.iter().enumerate() {
            for c in 0..cols {
                let want = half::f16::from_f32(
                    table_seen[id as usize * cols + c] + init_seen[t * cols + c],
                )
                .to_f32();
                let g = got[t * cols + c];
                assert!(
                    (g - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "{format:?} id {id} column {c}: {g} != {want}"
                );
            }
        }
    }
    // Layer norm: f16 in, f16 out, f32 arithmetic.
    let width = 300;
    let x = rng.vec(4 * width, 3.0);
    let (g, b) = (rng.vec(width, 1.0), rng.vec(width, 1.0));
    let xb = gpu
        .storage_buffer_init("x", &encode_act(&x, ActDtype::F16))
        .unwrap();
    let y = gpu.storage_buffer("y", (4 * width * 2) as u64);
    let gb = common::upload(&gpu, &g);
    let bb = common::upload(&gpu, &b);
    let mut rec = kernels.recorder();
    rec.layer_norm(&xb, 4, width, Some((&gb, &bb)), 1e-5, &y);
    rec.submit();
    let got = decode_act(
        &gpu.read_back(&[(&y, 0, (4 * width * 2) as u64)]).unwrap()[0],
        ActDtype::F16,
    );
    let want = reference::layer_norm(&round_to(&x, DType::F16), width, Some((&g, &b)), 1e-5);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-3 * w.abs().max(1.0),
            "layer norm element {i}: {g} != {w}"
        );
    }
}

/// The report names both families; forcing portable says so; a CPU adapter's automatic choice is portable, and
/// the subgroup self-check (run directly) passes wherever subgroups exist.
#[test]
fn variant_report_and_self_check() {
    let gpu = gpu();
    let forced = kernels_with(&gpu, ActDtype::F32, Choice::Portable);
    let report = forced.variants();
    assert_eq!(report.families.len(), 2);
    for c in &report.families {
        assert_eq!(c.variant, Variant::Portable);
        assert_eq!(c.reason, "forced portable");
    }
    let text = report.to_string();
    assert!(
        text.contains("decode linear") && text.contains("prefill"),
        "{text}"
    );

    let auto = kernels_with(&gpu, ActDtype::F32, Choice::Auto);
    let report = auto.variants();
    println!("{report}");
    for c in &report.families {
        let device = c.family.device_variant();
        let available = auto.variant_available(device);
        if gpu.info.device_type == wgpu::DeviceType::Cpu || available.is_err() {
            assert_eq!(c.variant, Variant::Portable, "{c:?}");
        }
        if let Err(why) = available {
            assert!(c.reason.contains(&why), "{c:?} should say {why}");
        }
    }
    match auto.self_check(Family::Gemv) {
        Ok(summary) => println!("subgroup GEMV self-check: {summary}"),
        Err(why) => assert!(
            auto.variant_available(Variant::Subgroup).is_err(),
            "the subgroup GEMV failed its self-check: {why}"
        ),
    }
    if let Err(why) = auto.self_check(Family::Tiled) {
        assert!(
            auto.variant_available(Variant::CoopMatrix).is_err(),
            "the tensor-core kernel failed its self-check: {why}"
        );
        eprintln!("skipped: tensor-core self-check ({why})");
    }
}

/// `bench_linear` times a layer with the kernel the kernels would choose, and refuses a variant the device lacks.
#[test]
fn bench_linear_times_the_chosen_kernel() {
    let gpu = gpu();
    let kernels = kernels_with(&gpu, ActDtype::F32, Choice::Auto);
    for m in [2, 20, 80] {
        let shape = LinearShape { m, n: 96, k: 64 };
        let t = bench_linear(&kernels, shape, WeightFormat::F16, None, None, 2, 1).unwrap();
        assert!(t.seconds > 0.0 && t.seconds.is_finite());
        assert_eq!(t.flops, 2.0 * (m * 96 * 64) as f64);
        assert_eq!(t.weight_bytes, 96 * 64 * 2);
        assert_eq!(
            t.kernel,
            kernels.linear_kernel(m, 96, WeightFormat::F16, None)
        );
    }
    if kernels.variant_available(Variant::CoopMatrix).is_err() {
        let shape = LinearShape {
            m: 80,
            n: 96,
            k: 64,
        };
        assert!(bench_linear(
            &kernels,
            shape,
            WeightFormat::F16,
            Some(Variant::CoopMatrix),
            None,
            1,
            1
        )
        .is_err());
    }
}
