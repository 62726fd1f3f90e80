//! Throughput of synthetic weights at opt-6.7b scale. Ignored by default (it produces 13 GB); run it with
//! `cargo test -p strata-runtime --test checkpoint_dummy -- --ignored --nocapture`.

use std::time::Instant;

use strata_runtime::config::OptConfig;
use strata_runtime::dummy::DummyWeights;
use strata_runtime::weights::{model_tensors, WeightSource};

/// opt-6.7b's architecture (REFERENCE.md section 1).
const OPT_6_7B: OptConfig = OptConfig::opt("opt-6.7b", 32, 32, 4096, 16384);

#[test]
#[ignore = "benchmark: generates opt-6.7b's 13 GB tensor by tensor"]
fn dummy_opt_6_7b_throughput() {
    assert_eq!(OPT_6_7B.params(), 6_658_473_984);
    let weights = DummyWeights::new(OPT_6_7B);
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut checksum = 0u64;
    for spec in model_tensors(&OPT_6_7B) {
        let t = weights.load(&spec).unwrap();
        bytes += t.bytes.len() as u64;
        // Touch the result so the work cannot be skipped.
        checksum = checksum.wrapping_add(t.bytes[t.bytes.len() / 2] as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, OPT_6_7B.model_bytes());
    println!(
        "dummy opt-6.7b: {:.2} GB in {secs:.2} s = {:.2} GB/s on {} rayon threads (checksum {checksum})",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / secs,
        rayon::current_num_threads()
    );
}

#[test]
#[ignore = "benchmark: generates opt-6.7b's 13 GB tensor by tensor into one reused buffer"]
fn dummy_opt_6_7b_throughput_reusing_a_buffer() {
    let weights = DummyWeights::new(OPT_6_7B);
    let mut buffer = Vec::new();
    let start = Instant::now();
    let mut bytes = 0u64;
    for spec in model_tensors(&OPT_6_7B) {
        weights.load_into(&spec, &mut buffer).unwrap();
        bytes += buffer.len() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, OPT_6_7B.model_bytes());
    println!(
        "dummy opt-6.7b into a reused buffer: {:.2} GB in {secs:.2} s = {:.2} GB/s on {} rayon threads",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / secs,
        rayon::current_num_threads()
    );
}
