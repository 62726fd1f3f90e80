//! The library API (`strata::Engine`) against transformers' reference on the trained fixture (text prompts in, text
//! and ids out), against the CLI, under a fixed offloading policy and the cost model's choice, with default options;
//! the typed entry's architecture check; and `examples/generate.rs`, run as CI's check that the example works.

use std::path::{Path, PathBuf};

use strata::hub::HubOptions;
use strata::models::Opt125m;
use strata::weights::{model_tensors, Checkpoint, WeightSource};
use strata::{
    AutoPolicy, Engine, EngineOptions, Error, FinishReason, GenerateOptions, Percent, Policy,
    PolicyChoice,
};

#[path = "../examples/generate.rs"]
mod example;

/// The trained fixture's architecture as a compile-time model, `specs::Trained`.
mod specs {
    strata::include_specs!("tests/specs/engine");
}

/// The trained fixture's directory and its transformers reference.
fn trained() -> (PathBuf, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained");
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (dir, serde_json::from_str(&text).unwrap())
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The reference's workload: its token budget, EOS ignored as transformers ran it.
fn reference_options(reference: &serde_json::Value) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: reference["max_new_tokens"].as_u64().unwrap() as usize,
        ignore_eos: true,
        ..GenerateOptions::default()
    }
}

fn open(dir: &Path) -> Engine {
    Engine::from_pretrained(dir, EngineOptions::default()).unwrap()
}

/// Text prompts through the engine give transformers' prompt ids, generated ids and generated text.
#[test]
fn text_in_gives_transformers_ids_and_text() {
    let (dir, reference) = trained();
    let mut engine = open(&dir);
    let prompts = strings(&reference["prompts"]);
    let out = engine
        .generate(&prompts, reference_options(&reference))
        .unwrap();
    let prompt_ids: Vec<Vec<u32>> = out.iter().map(|g| g.prompt_ids.clone()).collect();
    let generated: Vec<Vec<u32>> = out.iter().map(|g| g.token_ids.clone()).collect();
    let texts: Vec<String> = out.iter().map(|g| g.text.clone()).collect();
    assert_eq!(prompt_ids, ids(&reference["prompt_ids"]));
    assert_eq!(generated, ids(&reference["generated_ids"]));
    assert_eq!(texts, strings(&reference["generated_text"]));
    assert!(out.iter().all(|g| g.finish_reason == FinishReason::Length));
    // No policy given: everything stayed on the GPU.
    assert_eq!(engine.placed_policy(), None);
}

/// The token-id entry gives what `strata generate` gives for the same prompts.
#[test]
fn token_ids_in_match_the_cli() {
    let (dir, reference) = trained();
    let prompts = ids(&reference["prompt_ids"]);
    let options = reference_options(&reference);
    let out = open(&dir).generate_ids(&prompts, options).unwrap();

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.args(["generate", "--model"]).arg(&dir);
    for p in &prompts {
        let p: Vec<String> = p.iter().map(u32::to_string).collect();
        cmd.args(["--prompt-ids", &p.join(",")]);
    }
    cmd.args(["--max-new-tokens", &options.max_new_tokens.to_string()]);
    let cli = cmd.args(["--ignore-eos", "--json"]).output().unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let engine_ids: Vec<Vec<u32>> = out.iter().map(|g| g.token_ids.clone()).collect();
    assert_eq!(engine_ids, ids(&json["generated_ids"]));
    assert_eq!(
        out.iter().map(|g| g.text.clone()).collect::<Vec<_>>(),
        strings(&json["text"])
    );
}

/// A fixed policy that offloads half the weights and the whole cache to CPU memory, in blocks of two sequences
/// (three prompts: two blocks), gives the same tokens as transformers.
#[test]
fn a_fixed_offloading_policy_in_blocks_gives_the_same_tokens() {
    let (dir, reference) = trained();
    let policy = Policy {
        gpu_batch_size: 1,
        num_gpu_batches: 2,
        percent: Percent::from_array([50.0, 50.0, 0.0, 100.0, 100.0, 0.0]),
        ..Policy::default()
    };
    let mut engine = open(&dir).policy(PolicyChoice::Fixed(policy.clone()));
    let out = engine
        .generate(
            &strings(&reference["prompts"]),
            reference_options(&reference),
        )
        .unwrap();
    let generated: Vec<Vec<u32>> = out.into_iter().map(|g| g.token_ids).collect();
    assert_eq!(generated, ids(&reference["generated_ids"]));
    assert_eq!(engine.placed_policy(), Some(&policy));
}

/// `PolicyChoice::Auto` with a given hardware profile (FlexLLMGen's T4, so nothing is measured) and caps: the cost
/// model's policy runs, within the caps, and gives transformers' tokens.
#[test]
fn the_automatic_policy_runs_within_its_caps() {
    let (dir, reference) = trained();
    let tmp = tempfile::tempdir().unwrap();
    let profile = tmp.path().join("t4.toml");
    strata_runtime::hardware::HardwareProfile::t4()
        .save(&profile)
        .unwrap();
    let auto = AutoPolicy {
        gpu_mem: Some(64 << 20),
        cpu_mem: Some(1 << 30),
        profile: Some(profile),
        ..AutoPolicy::default()
    };
    let mut engine = open(&dir).policy(PolicyChoice::Auto(auto));
    let out = engine
        .generate(
            &strings(&reference["prompts"]),
            reference_options(&reference),
        )
        .unwrap();
    let generated: Vec<Vec<u32>> = out.into_iter().map(|g| g.token_ids).collect();
    assert_eq!(generated, ids(&reference["generated_ids"]));
    let chosen = engine.placed_policy().expect("auto places by a policy");
    assert_eq!(chosen.gpu_mem, Some(64 << 20));
    assert_eq!(chosen.cpu_mem, Some(1 << 30));
}

/// `GenerateOptions::default()` is greedy (transformers' default) with 32 new tokens, stopping at EOS.
#[test]
fn default_options_are_greedy_and_stop_at_eos() {
    let (dir, reference) = trained();
    let mut engine = open(&dir);
    let prompts = strings(&reference["prompts"]);
    let out = engine
        .generate(&prompts, GenerateOptions::default())
        .unwrap();
    let eos = engine.config().eos_token_id;
    for (g, want) in out.iter().zip(ids(&reference["generated_ids"])) {
        // Greedy: the reference's first tokens, unless EOS came first.
        let n = want.len().min(g.token_ids.len());
        assert_eq!(g.token_ids[..n], want[..n]);
        match g.finish_reason {
            FinishReason::Length => {
                assert_eq!(g.token_ids.len(), 32);
                assert!(!g.token_ids.contains(&eos));
            }
            FinishReason::Eos => {
                assert_eq!(g.token_ids.last(), Some(&eos));
                assert!(g.token_ids.len() <= 32);
            }
            other => panic!("unexpected finish reason {other:?}"),
        }
    }
}

/// The typed entry ties a compile-time model to the checkpoint: another architecture is an error naming both.
#[test]
fn a_typed_engine_refuses_another_architecture() {
    let (dir, _) = trained();
    let err = open(&dir).typed::<Opt125m>().unwrap_err();
    let message = err.to_string();
    match &err {
        Error::Architecture {
            expected,
            found,
            differences,
        } => {
            assert_eq!(*expected, "opt-125m");
            assert!(message.contains(found.as_str()), "{message}");
            assert!(
                differences.iter().any(|d| d == "hidden_size 768 vs 128"),
                "{differences:?}"
            );
        }
        other => panic!("expected an architecture error, got {other:?}"),
    }
    assert!(message.contains("opt-125m"), "{message}");

    // The built-in architecture with synthetic weights is opt-125m.
    let dummy = EngineOptions {
        dummy: true,
        ..EngineOptions::default()
    };
    let typed = Engine::from_pretrained("opt-125m", dummy)
        .unwrap()
        .typed::<Opt125m>()
        .unwrap();
    assert_eq!(typed.config().hidden_size, 768);
}

/// A typed engine of the checkpoint's own architecture generates as the untyped one does, and its shape-typed
/// weights are the checkpoint's tensors.
#[test]
fn a_typed_engine_of_the_right_architecture_generates_and_gives_typed_weights() {
    let (dir, reference) = trained();
    let mut engine = open(&dir).typed::<specs::Trained>().unwrap();
    let out = engine
        .generate(
            &strings(&reference["prompts"]),
            reference_options(&reference),
        )
        .unwrap();
    let generated: Vec<Vec<u32>> = out.into_iter().map(|g| g.token_ids).collect();
    assert_eq!(generated, ids(&reference["generated_ids"]));

    let weights = engine.typed_weights().unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let fc1 = model_tensors(engine.config())
        .into_iter()
        .find(|t| t.name == "decoder.layers.3.fc1.weight")
        .unwrap();
    let stored = checkpoint.load(&fc1).unwrap();
    assert_eq!(stored.shape, [512, 128]);
    let stored: Vec<f32> = le_f32(&stored.bytes);
    assert_eq!(weights.layers[3].fc1.weight.to_f32(), stored);
}

/// Little-endian f32 bytes as values.
fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A built-in name needs `dummy` said explicitly; an unknown name is an unknown model, not a download.
#[test]
fn names_without_weights_are_clear_errors() {
    let err = Engine::from_pretrained("opt-125m", EngineOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::NeedsWeights { name } if name == "opt-125m"),
        "{err:?}"
    );
    let err = Engine::from_pretrained("opt-125", EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnknownModel(_)), "{err:?}");
    let tmp = tempfile::tempdir().unwrap();
    let err = Engine::from_pretrained(tmp.path(), EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NotAModel { .. }), "{err:?}");
    let missing = tmp.path().join("no-such-model");
    let err = Engine::from_pretrained(&missing, EngineOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::NotAModel { path, .. } if *path == missing),
        "{err:?}"
    );
    // Synthetic weights have no tokenizer: text prompts are refused before anything is uploaded.
    let dummy = EngineOptions {
        dummy: true,
        ..EngineOptions::default()
    };
    let mut engine = Engine::from_pretrained("opt-125m", dummy).unwrap();
    let err = engine
        .generate(&["Hello"], GenerateOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::NoTokenizer { .. }), "{err:?}");
}

/// A Hub id goes to the Hub given in the options: an unreachable endpoint with an empty cache is `Error::Hub`,
/// naming the model and the endpoint.
#[test]
fn a_hub_id_downloads_through_the_given_endpoint() {
    let cache = tempfile::tempdir().unwrap();
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = EngineOptions {
        hub: Some(HubOptions {
            endpoint: endpoint.clone(),
            cache_dir: cache.path().to_path_buf(),
            token: None,
            offline: false,
            progress: false,
        }),
        ..EngineOptions::default()
    };
    let err = Engine::from_pretrained("facebook/opt-125m", options).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    assert!(message.contains("facebook/opt-125m"), "{message}");
    assert!(message.contains(&endpoint), "{message}");
}

/// `examples/generate.rs` produces the trained model's greedy continuation of its default prompt: the text
/// `strata generate --prompt` prints for it.
#[test]
fn the_example_generates_the_clis_text() {
    let text = example::run(example::DEFAULT_MODEL, example::DEFAULT_PROMPT).unwrap();
    assert!(!text.trim().is_empty(), "no text generated");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["generate", "--model", example::DEFAULT_MODEL])
        .args([
            "--prompt",
            example::DEFAULT_PROMPT,
            "--max-new-tokens",
            "24",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(strings(&json["text"]), [text]);
}

/// An engine can move to another thread (a server's worker) and be shared behind a lock.
#[test]
fn an_engine_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
    send_sync::<Engine<specs::Trained>>();
    send_sync::<Error>();
}
