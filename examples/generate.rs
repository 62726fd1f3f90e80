//! Text in, text out through strata's library API: open a model, generate, print.
//!
//! ```text
//! cargo run --example generate                                    # the small trained fixture, its default prompt
//! cargo run --example generate -- ~/models/opt-1.3b "Paris is the capital of"
//! cargo run --example generate -- facebook/opt-1.3b "Paris is"    # a Hub id: downloaded into the HF cache
//! ```
//!
//! Without arguments it runs `tests/fixtures/trained` (1 M parameters trained on CPython's documentation topics), so
//! it needs no download; CI runs it (tests/engine.rs).
use std::process::ExitCode;

use strata::{Engine, EngineOptions, GenerateOptions};

/// The model the example runs without arguments.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/trained");
/// Its prompt.
pub const DEFAULT_PROMPT: &str = "The return statement";

/// Generates 24 tokens after `prompt` with `model` (a directory, a Hub id) and returns the text.
pub fn run(model: &str, prompt: &str) -> strata::Result<String> {
    let mut engine = Engine::from_pretrained(model, EngineOptions::default())?;
    eprintln!("{} on {}", engine.config().name, engine.device());
    let options = GenerateOptions {
        max_new_tokens: 24,
        ..GenerateOptions::default()
    };
    let out = engine.generate(&[prompt], options)?;
    Ok(out[0].text.clone())
}

#[allow(dead_code)] // tests/engine.rs includes this file for `run`.
fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    let prompt = args.next().unwrap_or_else(|| DEFAULT_PROMPT.to_owned());
    match run(&model, &prompt) {
        Ok(text) => {
            println!("{prompt}{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
