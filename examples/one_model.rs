//! A binary built for one model, picked by a type at compile time, with its memory budget checked by the compiler.
//!
//! ```text
//! cargo run --example one_model --no-default-features --features opt-6-7b
//! ```
//!
//! Only opt-6.7b's spec is compiled in (`strata::models::ALL` has one entry). Change `Model` to
//! `strata::models::Opt30b` and the build fails: 30B's fp16 weights do not fit a 16 GiB GPU.
use strata::ModelSpec;

/// The model this binary serves.
type Model = strata::models::Opt6_7b;

/// A T4's memory, FlexLLMGen's reference GPU.
const GPU_BYTES: u64 = 16 << 30;
/// FlexLLMGen's benchmark workload: 512 prompt tokens, 32 generated.
const SEQ_LEN: u64 = 512 + 32;

const WEIGHTS: u64 = Model::CONFIG.model_bytes();
const _: () = assert!(
    WEIGHTS < GPU_BYTES,
    "the weights alone do not fit on the GPU"
);
/// Sequences whose KV cache and hidden state fit next to the weights.
const MAX_BATCH: u64 = (GPU_BYTES - WEIGHTS)
    / (Model::CONFIG.cache_bytes(1, SEQ_LEN) + Model::CONFIG.hidden_bytes(1, SEQ_LEN));
const _: () = assert!(MAX_BATCH >= 1, "no room for even one sequence's KV cache");

fn main() {
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{}: {} layers x hidden {} ({} heads of {}), {:.2} GiB of weights",
        Model::NAME,
        Model::NUM_HIDDEN_LAYERS,
        Model::HIDDEN_SIZE,
        Model::N_HEAD,
        Model::HEAD_DIM,
        gib(WEIGHTS)
    );
    println!(
        "a {:.0} GiB GPU holds the weights plus the KV cache of {MAX_BATCH} sequences of {SEQ_LEN} tokens",
        gib(GPU_BYTES)
    );
    let compiled_in: Vec<&str> = strata::models::ALL.iter().map(|c| c.name).collect();
    println!(
        "models compiled into this build: {}",
        compiled_in.join(", ")
    );
}
