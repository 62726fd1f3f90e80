//! Peers' published throughputs for FlexLLMGen's benchmark workload, drawn next to a `bench --sweep` of the same
//! model and workload. Sources: FlexLLMGen's README (T4 16 GB, 208 GB DRAM, 1.5 TB SSD), and the peers this project
//! ran on an H200 (shared/GPU-NOTES.md). Token/s; `batch` is the effective batch where the source gives it.

/// One published figure.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Published {
    /// System and placement.
    pub system: &'static str,
    /// The GPU.
    pub hardware: &'static str,
    /// Model name as strata spells it.
    pub model: &'static str,
    /// Tokens per prompt.
    pub prompt_len: usize,
    /// Tokens generated per prompt.
    pub gen_len: usize,
    /// Effective batch (gpu batch size x GPU batches), where published.
    pub batch: Option<usize>,
    /// Total throughput: prompts x gen_len / (prefill + decode).
    pub total_tok_s: Option<f64>,
    /// Decode throughput: prompts x (gen_len - 1) / decode.
    pub decode_tok_s: Option<f64>,
    /// Where the figure comes from.
    pub source: &'static str,
}

const README: &str = "FlexLLMGen README";
const H200: &str = "measured on an H200 (GPU-NOTES.md)";

const fn t4(
    system: &'static str,
    model: &'static str,
    batch: Option<usize>,
    tok_s: f64,
) -> Published {
    Published {
        system,
        hardware: "T4",
        model,
        prompt_len: 512,
        gen_len: 32,
        batch,
        total_tok_s: Some(tok_s),
        decode_tok_s: None,
        source: README,
    }
}

const fn h200(
    system: &'static str,
    model: &'static str,
    batch: usize,
    decode: f64,
    total: Option<f64>,
) -> Published {
    Published {
        system,
        hardware: "H200",
        model,
        prompt_len: 512,
        gen_len: 32,
        batch: Some(batch),
        total_tok_s: total,
        decode_tok_s: Some(decode),
        source: H200,
    }
}

/// Every published figure.
pub const PUBLISHED: &[Published] = &[
    t4("HF Accelerate", "opt-6.7b", None, 25.12),
    t4("DeepSpeed ZeRO-Inference", "opt-6.7b", None, 9.28),
    t4("Petals", "opt-6.7b", None, 8.25),
    // FlexLLMGen's policies: 6.7B all on GPU, gbs 2; 30B 48 x 3; 175B 32 x 8.
    t4("FlexLLMGen", "opt-6.7b", Some(2), 25.26),
    t4("FlexLLMGen + 4-bit", "opt-6.7b", None, 29.12),
    t4("HF Accelerate", "opt-30b", None, 0.62),
    t4("DeepSpeed ZeRO-Inference", "opt-30b", None, 0.60),
    t4("Petals", "opt-30b", None, 2.84),
    t4("FlexLLMGen", "opt-30b", Some(144), 7.32),
    t4("FlexLLMGen + 4-bit", "opt-30b", None, 8.38),
    t4("HF Accelerate", "opt-175b", None, 0.01),
    t4("DeepSpeed ZeRO-Inference", "opt-175b", None, 0.01),
    t4("Petals", "opt-175b", None, 0.08),
    t4("FlexLLMGen", "opt-175b", Some(256), 0.69),
    t4("FlexLLMGen + 4-bit", "opt-175b", None, 1.12),
    h200("HF transformers, all on GPU", "opt-6.7b", 64, 1204.0, None),
    h200("HF transformers, all on GPU", "opt-30b", 16, 258.0, None),
    h200(
        "FlexLLMGen, all on GPU",
        "opt-6.7b",
        32,
        1196.6,
        Some(843.1),
    ),
    h200(
        "FlexLLMGen, weights on CPU",
        "opt-6.7b",
        64,
        226.8,
        Some(214.5),
    ),
    h200(
        "FlexLLMGen, --percent 20 80 0 100 0 100 --cpu-cache-compute",
        "opt-30b",
        48,
        14.4,
        Some(13.8),
    ),
];

/// The figures for `model` on a workload of `prompt_len` + `gen_len` tokens.
pub fn matching(model: &str, prompt_len: usize, gen_len: usize) -> Vec<Published> {
    PUBLISHED
        .iter()
        .filter(|p| p.model == model && p.prompt_len == prompt_len && p.gen_len == gen_len)
        .copied()
        .collect()
}
