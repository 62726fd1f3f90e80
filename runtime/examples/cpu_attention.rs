//! Times decode attention on the CPU (`--cpu-cache-compute`) through the runtime's own routine
//! ([`strata_runtime::offload::cpu_attention::cpu_attention`]) on one layer of one GPU batch of an f16 model:
//! opt-30b's heads by default (hidden 7168, 56 heads of 128), a few sequences, 544 keys (prompt 512 + 32 generated),
//! the cache in plain host memory as the schedule keeps it:
//!
//! ```text
//! cargo run --release -p strata-runtime --example cpu_attention -- [--seqs 4] [--keys 544] [--hidden 7168] [--heads 56] [--iters 5] [--packed-bits 4]
//! ```
//!
//! Prints the best seconds per call and the cache bytes it read per second (keys and values, as stored). With
//! `--packed-bits B` the cache is packed (B bits in groups of 64, `--compress-cache`) and the routine is the one the
//! schedule runs over a packed cache: [`strata_runtime::compress::decode_attention`] over each sequence's pair-major
//! home where it lies, sequences in parallel.

use std::error::Error;
use std::time::Instant;

use rayon::prelude::*;
use strata_runtime::compress::{
    decode_attention, quantize, AttentionShape, CompressionConfig, PackedRef,
};
use strata_runtime::gpu::kernels::CacheDtype;
use strata_runtime::offload::cpu_attention::{cpu_attention, SeqRows};

fn main() -> Result<(), Box<dyn Error>> {
    let (mut seqs, mut keys, mut hidden, mut heads, mut iters, mut packed_bits) =
        (4usize, 544usize, 7168usize, 56usize, 5usize, 0usize);
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
            "--packed-bits" => packed_bits = value,
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
    if packed_bits > 0 {
        return packed(seqs, keys, hidden, heads, iters, packed_bits);
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

/// The packed-cache path: each sequence's K and V homes pair-major (`[heads * keys, head_dim]`, head h's token t at
/// row `h * keys + t`), attended where they lie, sequences in parallel.
fn packed(
    seqs: usize,
    keys: usize,
    hidden: usize,
    heads: usize,
    iters: usize,
    bits: usize,
) -> Result<(), Box<dyn Error>> {
    let config = CompressionConfig::new(u8::try_from(bits)?, 64)?;
    let hd = hidden / heads;
    let home = |seed: usize| -> Result<Vec<u8>, Box<dyn Error>> {
        let values: Vec<f32> = (0..keys * hidden)
            .map(|i| (((i * 31 + seed) % 97) as f32 - 48.0) * 1e-2)
            .collect();
        Ok(quantize(&values, heads * keys, hd, config)?
            .as_bytes()
            .to_vec())
    };
    let k_homes = (0..seqs)
        .map(|i| home(2 * i))
        .collect::<Result<Vec<_>, _>>()?;
    let v_homes = (0..seqs)
        .map(|i| home(2 * i + 1))
        .collect::<Result<Vec<_>, _>>()?;
    let views = k_homes
        .iter()
        .zip(&v_homes)
        .map(|(k, v)| {
            Ok((
                PackedRef::new(heads * keys, hd, config, k)?,
                PackedRef::new(heads * keys, hd, config, v)?,
            ))
        })
        .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
    let q: Vec<f32> = (0..seqs * hidden)
        .map(|i| ((i % 13) as f32 - 6.0) * 1e-2)
        .collect();
    let mask = vec![1u32; keys];
    let shape = AttentionShape {
        batch: 1,
        heads,
        head_dim: hd,
        seq_len: keys,
        token_stride: 1,
        bh_stride: keys,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let run = || {
        views
            .par_iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let q = &q[i * hidden..(i + 1) * hidden];
                decode_attention(q, k, v, &shape, Some((&mask, keys)), scale)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let out = run()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        std::hint::black_box(run()?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    let bytes = (k_homes.iter().chain(&v_homes).map(Vec::len).sum::<usize>()) as f64;
    println!(
        "cpu attention over a packed cache: {seqs} sequences x {keys} keys, hidden {hidden}, {heads} heads, {bits}-bit \
         groups of 64, {} threads: {:.4} s per call, {:.2} GB/s of packed cache, checksum {:.6}",
        rayon::current_num_threads(),
        best,
        bytes / best / 1e9,
        out.iter().flatten().map(|v| f64::from(*v)).sum::<f64>()
    );
    Ok(())
}
