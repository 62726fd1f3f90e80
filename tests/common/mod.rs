//! Helpers the integration tests share: the GPU, the committed fixtures, greedy generation options and logit
//! comparison. Each test binary includes this with `mod common;` and uses what it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_runtime::generate::{GenerateOptions, Sampling};
use strata_runtime::gpu::{Gpu, GpuOptions};

/// The f32 fixtures of tests/fixtures (exact comparisons hold on them).
pub const F32_FIXTURES: [&str; 3] = ["pre-ln-relu", "post-ln-proj", "gelu-no-bias"];

/// The default adapter (lavapipe on CPU machines).
pub fn gpu() -> Gpu {
    Gpu::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe on CPU machines)")
}

/// Fixture `name`: its directory, its prompts and how many tokens its reference generated.
pub fn fixture(name: &str) -> (PathBuf, Vec<Vec<u32>>, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["prompt_ids"].clone()).unwrap();
    let new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    (dir, prompts, new)
}

/// Greedy generation of `new` tokens, EOS ignored, every step's logits recorded.
pub fn options(new: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: new,
        sampling: Sampling::Greedy,
        ignore_eos: true,
        record_logits: true,
    }
}

/// The largest element-wise difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `strata generate --model DIR` of `prompts` (as `--prompt-ids`) for `new` tokens, EOS ignored, JSON on stdout; the
/// caller adds the flags under test.
pub fn generate_command(dir: &Path, prompts: &[Vec<u32>], new: usize) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["generate", "--model"]).arg(dir);
    for p in prompts {
        let ids: Vec<String> = p.iter().map(u32::to_string).collect();
        cmd.args(["--prompt-ids", &ids.join(",")]);
    }
    cmd.args([
        "--max-new-tokens",
        &new.to_string(),
        "--ignore-eos",
        "--json",
    ]);
    cmd
}
