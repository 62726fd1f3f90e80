//! Bytes once (issue 11, item 2): a decode step moves each offloaded weight byte once per block, whatever the number
//! of GPU batches, each offloaded cache byte once (rows [0, past) in, the new row out), hidden rows once per layer,
//! and with CPU attention (over an unpacked or a packed cache) only q, k, v down and the attention output up; counted by the tiers themselves
//! ([`strata_runtime::tiers::Tiers::moved`]) and compared with what the placement and the model's shape say.

mod common;

use std::cell::RefCell;
use std::path::Path;

use common::{fixture, gpu, options};

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::generate::Generator;
use strata_runtime::offload::placement::{BufferId, Workload};
use strata_runtime::offload::policy::{Percent, Policy, Transfer};
use strata_runtime::tiers::{CpuPath, Moved, Tier};

/// What one decode step should move for `p` (no disk cache or activations: their bytes are those of the CPU ones).
struct Expect {
    weights: [u64; 3],
    cache_row: u64,
    act_row: u64,
    layers: u64,
    seqs: u64,
}

impl Expect {
    /// Bytes of offloaded hidden rows a decode step moves each way: stored after the embedding and after each layer,
    /// fetched before each layer and the logits.
    fn hidden_rows(&self) -> u64 {
        (self.layers + 1) * self.seqs * self.act_row
    }
}

fn run(dir: &Path, prompts: &[Vec<u32>], new: usize, p: &Policy) -> (Expect, Vec<Moved>) {
    let checkpoint = Checkpoint::open(dir).unwrap();
    let gpu = gpu();
    let gen = Generator::with_policy(&gpu, &checkpoint, p, &|_| {}).unwrap();
    // The weights' homes are made at load: what each tier holds of the layers' weights.
    let mut weights = [0u64; 3];
    for spec in gen.ledger().live() {
        if let BufferId::Weight { .. } = spec.id {
            weights[Tier::ALL.iter().position(|&t| t == spec.tier).unwrap()] += spec.bytes;
        }
    }
    let c = *gen.config();
    let s = prompts.iter().map(Vec::len).max().unwrap();
    let placement = gen
        .placement(
            prompts.len(),
            Workload {
                prompt_len: s,
                gen_len: new,
            },
        )
        .unwrap();
    let expect = Expect {
        weights,
        cache_row: (c.hidden_size * placement.cache_dtype.bytes()) as u64,
        act_row: (c.hidden_size * gen.act_dtype().bytes()) as u64,
        layers: c.num_hidden_layers as u64,
        seqs: prompts.len() as u64,
    };
    let snapshots = RefCell::new(vec![gen.tiers().moved()]);
    let mut opts = options(new);
    opts.record_logits = false;
    gen.generate_with_progress(prompts, &opts, &|_| {
        snapshots.borrow_mut().push(gen.tiers().moved())
    })
    .unwrap();
    let snaps = snapshots.into_inner();
    let steps = snaps.windows(2).map(|w| w[1].since(&w[0])).collect();
    (expect, steps)
}

fn policy(
    weights: [f64; 2],
    cache: [f64; 2],
    act: [f64; 2],
    gbs: usize,
    ngb: usize,
    dir: &Path,
) -> Policy {
    Policy {
        gpu_batch_size: gbs,
        num_gpu_batches: ngb,
        percent: Percent::from_array([weights[0], weights[1], cache[0], cache[1], act[0], act[1]]),
        overlap: true,
        offload_dir: Some(dir.to_path_buf()),
        ..Policy::default()
    }
}

#[test]
fn a_decode_step_moves_each_offloaded_byte_once() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let offload = tempfile::tempdir().unwrap();
    let new = 3;
    let s = prompts.iter().map(Vec::len).max().unwrap() as u64;
    let n = prompts.len();
    // Weights split over CPU and disk, cache and activations on the CPU, one and several GPU batches.
    for (gbs, ngb) in [(n, 1), (1, n)] {
        let p = policy(
            [0.0, 50.0],
            [0.0, 100.0],
            [0.0, 100.0],
            gbs,
            ngb,
            offload.path(),
        );
        let (e, steps) = run(&dir, &prompts, new, &p);
        assert!(
            e.weights[1] > 0 && e.weights[2] > 0,
            "{p:?}: weights on CPU and disk"
        );
        assert_eq!(steps.len(), new);
        for (t, m) in steps.iter().enumerate().skip(1) {
            let past = s + t as u64 - 1;
            let (cache_in, cache_out) = (
                e.layers * e.seqs * 2 * past * e.cache_row,
                e.layers * e.seqs * 2 * e.cache_row,
            );
            let act = e.hidden_rows();
            let want = Moved::from_pairs(&[
                (Tier::Cpu, Tier::Gpu, e.weights[1] + cache_in + act),
                (Tier::Disk, Tier::Gpu, e.weights[2]),
                (Tier::Gpu, Tier::Cpu, cache_out + act),
            ]);
            assert_eq!(m.pairs(), want.pairs(), "{gbs} x {ngb}, decode step {t}");
        }
    }
}

#[test]
fn cpu_attention_moves_only_q_k_v_down_and_its_output_up() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let offload = tempfile::tempdir().unwrap();
    let new = 3;
    let n = prompts.len();
    // Activations on the GPU, or in CPU memory (several GPU batches then pipeline through two activation slots).
    for (gbs, ngb, act) in [
        (n, 1, [100.0, 0.0]),
        (1, n, [100.0, 0.0]),
        (1, n, [0.0, 100.0]),
    ] {
        let mut p = policy([0.0, 100.0], [0.0, 100.0], act, gbs, ngb, offload.path());
        p.cpu_cache_compute = true;
        let (e, steps) = run(&dir, &prompts, new, &p);
        let hidden = if act[1] > 0.0 { e.hidden_rows() } else { 0 };
        for (t, m) in steps.iter().enumerate().skip(1) {
            // q comes back as activations, k and v as f32 rows the CPU rounds to the cache's dtype.
            let down = e.layers * e.seqs * (e.act_row + 2 * e.cache_row.max(e.act_row));
            let up = e.layers * e.seqs * e.act_row;
            let want = Moved::from_pairs(&[
                (Tier::Cpu, Tier::Gpu, e.weights[1] + up + hidden),
                (Tier::Gpu, Tier::Cpu, down + hidden),
            ]);
            assert_eq!(
                m.pairs(),
                want.pairs(),
                "{gbs} x {ngb}, activations {act:?}, decode step {t}"
            );
        }
    }
}

#[test]
fn zero_copy_reads_cpu_weights_in_place_and_keeps_the_tokens() {
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let offload = tempfile::tempdir().unwrap();
    let new = 3;
    let n = prompts.len();
    assert_eq!(n, 3, "the cases below split the fixture's 3 prompts");
    let gpu = gpu();
    let dma = CpuPath::best_for(gpu.device.features()) == CpuPath::DmaBuffer;
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let all_gpu = Generator::with_policy(&gpu, &checkpoint, &Policy::default(), &|_| {})
        .unwrap()
        .generate(&prompts, &options(new))
        .unwrap();
    let (on_gpu, on_cpu) = ([100.0, 0.0], [0.0, 100.0]);
    // (transfer, GPU batch size, GPU batches, where activations live, whether decode runs block steps)
    for (transfer, gbs, ngb, act, block) in [
        (Transfer::Auto, n, 1, on_gpu, false),
        (Transfer::Auto, 1, n, on_gpu, false),
        (Transfer::Copy, n, 1, on_gpu, false),
        // Several GPU batches with their caches and activations on the GPU: each layer once over the block.
        (Transfer::ZeroCopy, 1, n, on_gpu, true),
        (Transfer::ZeroCopy, 2, 2, on_gpu, true),
        // Activations offloaded: each GPU batch's dispatches read the weights again.
        (Transfer::ZeroCopy, 1, n, on_cpu, false),
    ] {
        let what = format!("{transfer} {gbs} x {ngb}, activations {act:?}");
        let p = Policy {
            transfer,
            ..policy([0.0, 100.0], [100.0, 0.0], act, gbs, ngb, offload.path())
        };
        let gen = Generator::with_policy(&gpu, &checkpoint, &p, &|_| {}).unwrap();
        let zero_copy = gen.decode_zero_copy(ngb);
        assert_eq!(
            zero_copy,
            dma && transfer.decode_zero_copy(true, ngb),
            "{what}"
        );
        let s = prompts.iter().map(Vec::len).max().unwrap();
        let placement = gen
            .placement(
                n,
                Workload {
                    prompt_len: s,
                    gen_len: new,
                },
            )
            .unwrap();
        assert_eq!(placement.block_decode, block, "{what}");
        let out = gen.generate(&prompts, &options(new)).unwrap();
        assert_eq!(out.generated_ids, all_gpu.generated_ids, "{what}");
        let diff = common::max_abs_diff(&out.logits.unwrap(), all_gpu.logits.as_ref().unwrap());
        assert!(diff < 1e-4, "{what}: logits differ by {diff}");
        // Dispatches per GPU batch read the weights in place once per batch; a block step and copies, once.
        let reads = if zero_copy && !block { ngb as u64 } else { 1 };
        assert_eq!(gen.decode_weight_passes(&placement) as u64, reads, "{what}");
        let (e, steps) = run(&dir, &prompts, new, &p);
        let act_bytes = if act == on_cpu { e.hidden_rows() } else { 0 };
        for m in &steps[1..] {
            let want = Moved::from_pairs(&[
                (Tier::Cpu, Tier::Gpu, reads * e.weights[1] + act_bytes),
                (Tier::Gpu, Tier::Cpu, act_bytes),
            ]);
            assert_eq!(m.pairs(), want.pairs(), "{what}");
            let in_place = if zero_copy { reads * e.weights[1] } else { 0 };
            assert_eq!(m.in_place_bytes, in_place, "{what}");
        }
    }
}

#[test]
fn cpu_attention_over_a_packed_cache_moves_no_cache_rows() {
    // A packed cache in CPU memory attends on the CPU too: a decode step moves q and the new k, v rows down (as
    // activations, which the CPU quantises into the packed homes) and the attention output up, never a cache row.
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let offload = tempfile::tempdir().unwrap();
    let new = 3;
    let n = prompts.len();
    for (gbs, ngb) in [(n, 1), (2, n.div_ceil(2))] {
        let p = Policy {
            cpu_cache_compute: true,
            compress_cache: true,
            ..policy(
                [0.0, 100.0],
                [0.0, 100.0],
                [100.0, 0.0],
                gbs,
                ngb,
                offload.path(),
            )
        };
        let (e, steps) = run(&dir, &prompts, new, &p);
        for (t, m) in steps.iter().enumerate().skip(1) {
            let down = e.layers * e.seqs * 3 * e.act_row;
            let up = e.layers * e.seqs * e.act_row;
            let want = Moved::from_pairs(&[
                (Tier::Cpu, Tier::Gpu, e.weights[1] + up),
                (Tier::Gpu, Tier::Cpu, down),
            ]);
            assert_eq!(m.pairs(), want.pairs(), "{gbs} x {ngb}, decode step {t}");
        }
    }
}
