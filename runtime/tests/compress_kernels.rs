//! The packed cache's q4_* WGSL kernels on a real wgpu device (lavapipe on CPU machines) against `dequantize` + CPU references.
//! Each kernel is dispatched directly with its uniform and grid, so these tests pin the WGSL files' own contracts.

mod common;

use strata_runtime::compress::{
    decode_attention, dequantize, quantize, AttentionParams, AttentionShape, CompressionConfig,
    DequantParams, PackedTensor, QuantizeParams, ATTENTION_WGSL, DEQUANT_WGSL, QUANTIZE_WGSL,
};
use strata_runtime::gpu::kernels::ActDtype;
use wgpu::util::DeviceExt;

/// The shared test device, for raw dispatches of one WGSL kernel outside the runtime's `Recorder`.
struct Device(strata_runtime::gpu::Gpu);

fn gpu() -> Device {
    Device(common::gpu())
}

impl Device {
    /// The kernel's `main`, compiled with pipeline constant `BITS`.
    fn pipeline(&self, source: &str, bits: u8) -> wgpu::ComputePipeline {
        self.pipeline_with(source, &[("BITS", bits as f64)])
    }

    /// The kernel's `main` after the f32 activation part (the rows it reads and writes are f32), compiled with
    /// pipeline `constants`.
    fn pipeline_with(&self, source: &str, constants: &[(&str, f64)]) -> wgpu::ComputePipeline {
        let device = &self.0.device;
        let source = [ActDtype::F32.wgsl(), source].join("\n");
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        })
    }

    /// A storage buffer holding `bytes` (at least 4: a binding may not be empty).
    fn storage(&self, bytes: &[u8]) -> wgpu::Buffer {
        self.0.storage_buffer_init("compress test", bytes).unwrap()
    }

    /// Runs `pipeline` with a uniform at binding 0 and `buffers` at 1.., and reads back the last buffer as f32.
    fn run(
        &self,
        pipeline: &wgpu::ComputePipeline,
        uniform: &[u8],
        buffers: &[&wgpu::Buffer],
        grid: (u32, u32, u32),
    ) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(&self.run_bytes(pipeline, uniform, buffers, grid))
    }

    /// Like `run`, returning the last buffer's bytes.
    fn run_bytes(
        &self,
        pipeline: &wgpu::ComputePipeline,
        uniform: &[u8],
        buffers: &[&wgpu::Buffer],
        grid: (u32, u32, u32),
    ) -> Vec<u8> {
        let device = &self.0.device;
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: uniform,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(grid.0, grid.1, grid.2);
        }
        self.0.queue.submit([encoder.finish()]);
        let out = buffers.last().expect("an output buffer");
        self.0.read_back(&[(out, 0, out.size())]).unwrap().remove(0)
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Whether GPU-decoded values equal the CPU's `dequantize` to f32 rounding.
fn decodes_like(got: &[f32], want: &[f32]) -> bool {
    got.iter()
        .zip(want)
        .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0))
}

#[test]
fn dequant_kernel_decodes_cache_ranges_and_gathers_embedding_rows() {
    let gpu = gpu();
    for (bits, group) in [(4u8, 64usize), (8, 32), (2, 64)] {
        let config = CompressionConfig::new(bits, group).unwrap();
        let mut rng = Rng(7 + bits as u64);
        // A KV cache of head_dim 80 (two groups, the second padded) and a small embedding table.
        let (rows, cols) = (50, 80);
        let values = rng.vec(rows * cols, 2.0);
        let packed: PackedTensor = quantize(&values, rows, cols, config).unwrap();
        let decoded = dequantize(&packed);
        let pipeline = gpu.pipeline(DEQUANT_WGSL, bits);
        let wbuf = gpu.storage(packed.as_bytes());

        let params = DequantParams::new(&packed.layout(), 20, Some(13)).unwrap();
        let out = gpu.storage(&vec![0u8; 4 * 20 * cols]);
        let got = gpu.run(
            &pipeline,
            bytemuck::bytes_of(&params),
            &[&wbuf, &gpu.storage(&[]), &out],
            params.grid(config),
        );
        let want = &decoded[13 * cols..33 * cols];
        assert!(decodes_like(&got, want), "bits {bits}: cache range");

        let ids: Vec<u32> = vec![49, 0, 7, 7, 31];
        let params = DequantParams::new(&packed.layout(), ids.len(), None).unwrap();
        let out = gpu.storage(&vec![0u8; 4 * ids.len() * cols]);
        let idbuf = gpu.storage(bytemuck::cast_slice(&ids));
        let got = gpu.run(
            &pipeline,
            bytemuck::bytes_of(&params),
            &[&wbuf, &idbuf, &out],
            params.grid(config),
        );
        for (r, &id) in ids.iter().enumerate() {
            let want = &decoded[id as usize * cols..(id as usize + 1) * cols];
            let row = &got[r * cols..(r + 1) * cols];
            assert!(decodes_like(row, want), "bits {bits}: id {id}");
        }
    }
    assert!(DequantParams::new(
        &PackedTensor::zeros(10, 64, CompressionConfig::DEFAULT)
            .unwrap()
            .layout(),
        5,
        Some(6)
    )
    .is_none());
}

#[test]
fn gpu_quantize_packs_cache_rows_like_the_cpu() {
    let gpu = gpu();
    for (bits, group) in [(4u8, 64usize), (8, 32), (2, 64)] {
        let config = CompressionConfig::new(bits, group).unwrap();
        let mut rng = Rng(11 + bits as u64);
        let (rows, cols) = (24, 80);
        let mut values = rng.vec(rows * cols, 3.0);
        // A constant group, an outlier-heavy group, a tiny-range group and a tiny-valued group.
        values[..64].fill(0.75);
        values[cols * 3 + 5] = 900.0;
        for (i, x) in values[cols * 5..cols * 5 + 64].iter_mut().enumerate() {
            *x = 1.0 + i as f32 * 1e-6;
        }
        for x in &mut values[cols * 7..cols * 8] {
            *x *= 1e-6;
        }
        // Pack into every other row of a 60-row cache starting at row 9, as the CPU does with write_rows.
        let capacity = 60;
        let mut cpu = PackedTensor::zeros(capacity, cols, config).unwrap();
        for r in 0..rows {
            cpu.write_rows(9 + 2 * r, &values[r * cols..(r + 1) * cols])
                .unwrap();
        }
        let empty = PackedTensor::zeros(capacity, cols, config).unwrap();
        let params = QuantizeParams::new(&empty.layout(), config, rows, 9, 2).unwrap();
        let pipeline = gpu.pipeline(QUANTIZE_WGSL, bits);
        let input = gpu.storage(bytemuck::cast_slice(&values));
        let packed = gpu.storage(empty.as_bytes());
        let bytes = gpu.run_bytes(
            &pipeline,
            bytemuck::bytes_of(&params),
            &[&input, &packed],
            params.grid(),
        );
        let ours = PackedTensor::from_bytes(capacity, cols, config, &bytes).unwrap();
        let (a, b) = (ours.words(), cpu.words());
        let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
        // Words may differ only where WGSL's division or tie rounding lands on the other side.
        assert!(
            same * 100 >= a.len() * 99,
            "bits {bits}: only {same} of {} words match the CPU",
            a.len()
        );
        let (got, want) = (dequantize(&ours), dequantize(&cpu));
        for r in 0..capacity {
            for c in 0..cols {
                let (g, w) = (got[r * cols + c], want[r * cols + c]);
                let (step, _) = cpu.group_params(r, c / group);
                assert!(
                    (g - w).abs() <= step * 1.01 + 1e-7,
                    "bits {bits} ({r}, {c}): gpu {g} cpu {w}"
                );
                if r < 9 || r % 2 == 0 {
                    assert_eq!(g, 0.0, "row {r} was not written and must stay empty");
                }
            }
        }
    }
}

/// Naive f64 attention over dequantised caches, independent of `decode_attention`.
fn attention_reference(
    query: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttentionShape,
    mask: &[u32],
    scale: f32,
) -> Vec<f64> {
    let hd = shape.head_dim;
    let mut out = vec![0f64; shape.batch * shape.heads * hd];
    for bh in 0..shape.batch * shape.heads {
        let b = bh / shape.heads;
        let rows: Vec<usize> = (0..shape.seq_len)
            .filter(|&t| mask[b * shape.seq_len + t] != 0)
            .map(|t| t * shape.token_stride + bh * shape.bh_stride)
            .collect();
        let scores: Vec<f64> = rows
            .iter()
            .map(|&r| {
                (0..hd)
                    .map(|d| query[bh * hd + d] as f64 * k[r * hd + d] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (&r, w) in rows.iter().zip(&weights) {
            for d in 0..hd {
                out[bh * hd + d] += w / total * v[r * hd + d] as f64;
            }
        }
    }
    out
}

#[test]
fn attention_kernel_reads_the_packed_cache() {
    let gpu = gpu();
    for (bits, group, head_dim, flex_layout) in [
        (4u8, 64usize, 80usize, true),
        (4, 64, 64, false),
        (8, 32, 128, true),
        (2, 64, 64, true),
    ] {
        let config = CompressionConfig::new(bits, group).unwrap();
        let (batch, heads, seq_len, capacity) = (3, 4, 37, 50);
        let shape = if flex_layout {
            AttentionShape::flexllmgen(batch, heads, head_dim, seq_len)
        } else {
            AttentionShape {
                batch,
                heads,
                head_dim,
                seq_len,
                token_stride: 1,
                bh_stride: capacity,
            }
        };
        let rows = capacity * batch * heads;
        let mut rng = Rng(21 + head_dim as u64 + bits as u64);
        let k = quantize(&rng.vec(rows * head_dim, 1.0), rows, head_dim, config).unwrap();
        let v = quantize(&rng.vec(rows * head_dim, 1.0), rows, head_dim, config).unwrap();
        let query = rng.vec(batch * heads * head_dim, 1.0);
        // Sequence 0 attends everywhere, sequence 1 is left-padded by 5, sequence 2 is fully masked.
        let mask: Vec<u32> = (0..batch * seq_len)
            .map(|i| match i / seq_len {
                0 => 1,
                1 => (i % seq_len >= 5) as u32,
                _ => 0,
            })
            .collect();
        let scale = (head_dim as f32).powf(-0.5);
        let cpu = decode_attention(&query, &k, &v, &shape, Some((&mask, seq_len)), scale).unwrap();
        let want = attention_reference(
            &query,
            &dequantize(&k),
            &dequantize(&v),
            &shape,
            &mask,
            scale,
        );
        for (i, (c, w)) in cpu.iter().zip(&want).enumerate() {
            assert!(
                (*c as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "cpu decode_attention {i}: {c} vs {w}"
            );
        }
        assert!(
            cpu[2 * heads * head_dim..].iter().all(|&x| x == 0.0),
            "a fully masked sequence gives zeros"
        );

        let params = AttentionParams::new(&shape, &k, &v, Some(seq_len), scale).unwrap();
        let pipeline = gpu.pipeline(ATTENTION_WGSL, bits);
        let buffers = [
            gpu.storage(bytemuck::cast_slice(&query)),
            gpu.storage(k.as_bytes()),
            gpu.storage(v.as_bytes()),
            gpu.storage(bytemuck::cast_slice(&mask)),
            gpu.storage(&vec![0u8; 4 * batch * heads * seq_len]),
            gpu.storage(&vec![0xffu8; 4 * batch * heads * head_dim]),
        ];
        let refs: Vec<&wgpu::Buffer> = buffers.iter().collect();
        let got = gpu.run(&pipeline, bytemuck::bytes_of(&params), &refs, params.grid());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * w.abs().max(1.0),
                "bits {bits} head_dim {head_dim}: output {i}: gpu {g} vs {w}"
            );
        }
    }
    // Shapes that address rows outside the cache are refused before any dispatch.
    let small = PackedTensor::zeros(10, 64, CompressionConfig::DEFAULT).unwrap();
    let shape = AttentionShape::flexllmgen(2, 2, 64, 3);
    assert!(AttentionParams::new(&shape, &small, &small, None, 1.0).is_err());
}
