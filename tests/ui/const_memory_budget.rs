// A binary built for one model checks its memory budget at compile time: opt-30b's fp16 weights (about 56 GiB)
// do not fit a 16 GiB GPU, so this does not build.
use strata::ModelSpec;

type Model = strata::models::Opt30b;

const _: () = assert!(Model::CONFIG.model_bytes() < 16 << 30, "the model's weights do not fit a 16 GiB GPU");

fn main() {}
