//! Times decode attention on the CPU (`--cpu-cache-compute`) through the runtime's own routine
//! ([`strata_runtime::offload::cpu_attention::cpu_attention`]) on one layer of one GPU batch of an f16 model:
//! opt-30b's heads by default (hidden 7168, 56 heads of 128), a few sequences, 544 keys (prompt 512 + 32 generated),
//! the cache in plain host memory as the schedule keeps it:
//!
//! ```text
//! cargo run --release -p strata-runtime --example cpu_attention -- [--seqs 4] [--keys 544] [--hidden 7168] [--heads 56] [--iters 5]
//! ```
//!
//! Prints the best seconds per call and the cache bytes it read per second (keys and values, as stored).

use std::error::Error;
use std::time::Instant;

use strata_runtime::gpu::kernels::CacheDtype;
use strata_runtime::offload::cpu_attention::{cpu_attention, SeqRows};

fn main() -> Result<(), Box<dyn Error>> {
    let (mut seqs, mut keys, mut hidden, mut heads, mut iters) =
        (4usize, 544usize, 7168usize, 56usize, 5usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value: usize = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value"))?
            .parse()
            .map_err(|e| format!("{arg}: {e}"))?;
        match arg.as_str() {
            "--seqs" => seqs = value,
            "--keys" => keys = value,
            "--hidden" => hidden = value,
            "--heads" => heads = value,
            "--iters" => iters = value,
            other => {
                return Err(
                    format!("unknown argument {other:?}; see the example's doc comment").into(),
                )
            }
        }
    }
    if heads == 0 || hidden % heads != 0 {
        return Err("--heads must divide --hidden".into());
    }
    let dtype = CacheDtype::F16;
    // Each sequence's cached keys and values as the CPU tier holds them (f16), the new row last.
    let cache = |seed: usize| -> Vec<u8> {
        (0..keys * hidden)
            .flat_map(|i| {
                half::f16::from_f32((((i * 31 + seed) % 97) as f32 - 48.0) * 1e-2).to_le_bytes()
            })
            .collect()
    };
    let k_homes: Vec<Vec<u8>> = (0..seqs).map(|i| cache(2 * i)).collect();
    let v_homes: Vec<Vec<u8>> = (0..seqs).map(|i| cache(2 * i + 1)).collect();
    let q: Vec<f32> = (0..seqs * hidden)
        .map(|i| ((i % 13) as f32 - 6.0) * 1e-2)
        .collect();
    let masks: Vec<Vec<u32>> = (0..seqs).map(|_| vec![1u32; keys]).collect();
    let mask_refs: Vec<&[u32]> = masks.iter().map(Vec::as_slice).collect();
    let rows: Vec<SeqRows> = k_homes
        .iter()
        .zip(&v_homes)
        .map(|(k, v)| SeqRows { keys: k, values: v })
        .collect();

    let run = || cpu_attention(&q, &rows, dtype, &mask_refs, heads, keys, 1.0);
    let out = run();
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        std::hint::black_box(run());
        best = best.min(start.elapsed().as_secs_f64());
    }
    let bytes = (2 * seqs * keys * hidden * dtype.bytes()) as f64;
    println!(
        "cpu attention: {seqs} sequences x {keys} keys, hidden {hidden}, {heads} heads, f16 cache, {} threads: \
         {:.4} s per call, {:.2} GB/s of cache, checksum {:.6}",
        rayon::current_num_threads(),
        best,
        bytes / best / 1e9,
        out.iter().map(|v| f64::from(*v)).sum::<f64>()
    );
    Ok(())
}
