//! Opening Hugging Face OPT model directories written here with the safetensors crate: every layout strata accepts
//! (single file, sharded, with or without the `model.` prefix, tied or untied head, f16/bf16/f32) and every error case.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, View};
use strata_runtime::checkpoint::{
    config_to_json, read_config, to_f16_bits, to_f32, Checkpoint, CheckpointError,
};
use strata_runtime::config::{Activation, DType, OptConfig};
use strata_runtime::weights::{model_tensors, WeightError, WeightSource};

fn tiny() -> OptConfig {
    OptConfig {
        vocab_size: 40,
        max_seq_len: 20,
        ..OptConfig::opt("tiny-opt", 2, 4, 16, 32)
    }
}

/// A tensor as written to a file: raw little-endian bytes in a safetensors dtype.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The value element `i` of the `k`-th tensor holds: differs between tensors, and is (n - 128) / 8 with n < 256,
/// at most 8 significant bits, so exactly representable in bf16 as well as f16.
fn value(k: usize, i: usize) -> f32 {
    ((k * 7 + i % 61) % 256) as f32 * 0.125 - 16.0
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("test writes no {other:?}"),
    }
}

/// The tensors of `config` as `OPTForCausalLM.save_pretrained` names them (or bare `decoder.*` without `prefix`),
/// keyed by stored name, plus `lm_head.weight` when `with_head`.
fn tensors(
    config: &OptConfig,
    dtype: Dtype,
    prefix: bool,
    with_head: bool,
) -> BTreeMap<String, Raw> {
    let mut specs = model_tensors(config);
    if with_head && config.tie_word_embeddings {
        let mut head = specs[0].clone();
        head.name = "lm_head.weight".into();
        specs.push(head);
    }
    specs
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let name = if prefix && spec.name.starts_with("decoder.") {
                format!("model.{}", spec.name)
            } else {
                spec.name.clone()
            };
            let values: Vec<f32> = (0..spec.numel()).map(|i| value(k, i)).collect();
            let raw = Raw {
                dtype,
                shape: spec.shape.clone(),
                data: encode(dtype, &values),
            };
            (name, raw)
        })
        .collect()
}

fn write_config(dir: &Path, config: &OptConfig) {
    std::fs::write(dir.join("config.json"), config_to_json(config)).unwrap();
}

fn write_single(dir: &Path, tensors: &BTreeMap<String, Raw>) {
    safetensors::serialize_to_file(tensors.iter(), None, &dir.join("model.safetensors")).unwrap();
}

/// Splits the tensors round-robin over `n` shards named as transformers names them, plus the index.
fn write_sharded(dir: &Path, tensors: &BTreeMap<String, Raw>, n: usize) {
    let mut weight_map = serde_json::Map::new();
    for s in 0..n {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, n);
        let part: Vec<(&String, &Raw)> = tensors.iter().skip(s).step_by(n).collect();
        for (name, _) in &part {
            weight_map.insert((*name).clone(), file.clone().into());
        }
        safetensors::serialize_to_file(part, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Every tensor the config needs loads, borrowed from the map, with the values written (in any dtype).
fn assert_loads_everything(ckpt: &Checkpoint, dtype: DType) {
    ckpt.validate_all().unwrap();
    let config = *ckpt.config();
    let expected_lists = tensors(&config, Dtype::F32, false, false);
    for spec in model_tensors(&config) {
        let t = ckpt.load(&spec).unwrap();
        assert!(
            matches!(t.bytes, Cow::Borrowed(_)),
            "{} was copied",
            spec.name
        );
        assert_eq!(t.dtype, dtype);
        assert_eq!(t.shape, spec.shape);
        let want: Vec<f32> = expected_lists[&spec.name]
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(to_f32(&t), want, "{}", spec.name);
        let want_f16: Vec<u16> = want.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
        assert_eq!(to_f16_bits(&t), want_f16, "{}", spec.name);
    }
}

#[test]
fn config_json_round_trips_every_variant() {
    let base = tiny();
    let variants = [
        base,
        OptConfig {
            word_embed_proj_dim: 8,
            do_layer_norm_before: false,
            ..base
        },
        OptConfig {
            activation: Activation::Gelu,
            enable_bias: false,
            layer_norm_elementwise_affine: false,
            ..base
        },
        OptConfig {
            remove_final_layer_norm: true,
            tie_word_embeddings: false,
            dtype: DType::BF16,
            layer_norm_eps: 1e-6,
            pad_token_id: 0,
            bos_token_id: 3,
            eos_token_id: 4,
            ..base
        },
        OptConfig {
            dtype: DType::F32,
            max_seq_len: 7,
            ..base
        },
    ];
    for config in variants {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &config);
        assert_eq!(read_config(dir.path()).unwrap(), config);
    }
}

/// facebook/opt-125m's config.json as published (older transformers: `torch_dtype`, no enable_bias or tie field).
const OPT_125M_CONFIG: &str = r#"{
  "_name_or_path": "facebook/opt-125m", "_remove_final_layer_norm": false, "activation_dropout": 0.0,
  "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
  "bos_token_id": 2, "do_layer_norm_before": true, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 3072,
  "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "prefix": "</s>",
  "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": true, "vocab_size": 50272,
  "word_embed_proj_dim": 768
}"#;

#[test]
fn published_opt_125m_config_reads_with_hf_defaults() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), OPT_125M_CONFIG).unwrap();
    let c = read_config(dir.path()).unwrap();
    assert_eq!(c.name, "opt-125m");
    assert_eq!(
        (
            c.num_hidden_layers,
            c.n_head,
            c.hidden_size,
            c.ffn_embed_dim,
            c.vocab_size
        ),
        (12, 12, 768, 3072, 50272)
    );
    assert_eq!((c.max_seq_len, c.num_positions()), (2048, 2050));
    assert_eq!((c.pad_token_id, c.bos_token_id, c.eos_token_id), (1, 2, 2));
    assert!(
        c.enable_bias
            && c.layer_norm_elementwise_affine
            && c.tie_word_embeddings
            && c.do_layer_norm_before
    );
    assert_eq!(c.dtype, DType::F16);
    assert_eq!(c.layer_norm_eps, 1e-5);
    // REFERENCE.md section 1: 125,239,296 parameters.
    assert_eq!(c.params(), 125_239_296);
}

#[test]
fn name_falls_back_to_the_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("my-opt");
    std::fs::create_dir(&dir).unwrap();
    let text = OPT_125M_CONFIG.replace("\"_name_or_path\": \"facebook/opt-125m\",", "");
    std::fs::write(dir.join("config.json"), text).unwrap();
    assert_eq!(read_config(&dir).unwrap().name, "my-opt");
}

#[test]
fn config_errors_name_the_file_and_field() {
    let cases = [
        (r#""ffn_dim": 3072,"#, "", "field `ffn_dim`: missing"),
        (
            r#""hidden_size": 768"#,
            r#""hidden_size": "768""#,
            "field `hidden_size`: expected a non-negative integer, found \"768\"",
        ),
        (
            r#""activation_function": "relu""#,
            r#""activation_function": "silu""#,
            "field `activation_function`: `silu` is not supported",
        ),
        (
            r#""num_attention_heads": 12"#,
            r#""num_attention_heads": 7"#,
            "field `num_attention_heads`: n_head = 7 does not divide hidden_size = 768",
        ),
        (
            r#""model_type": "opt""#,
            r#""model_type": "llama""#,
            "field `model_type`: `llama` is not an OPT-family model",
        ),
        (
            r#""torch_dtype": "float16""#,
            r#""torch_dtype": "int8""#,
            "field `torch_dtype`: `int8` is not a dtype",
        ),
        (
            r#""pad_token_id": 1"#,
            r#""pad_token_id": 60000"#,
            "field `pad_token_id`: pad_token_id = 60000 is outside the vocabulary of 50272",
        ),
        (
            r#""do_layer_norm_before": true"#,
            r#""do_layer_norm_before": 1"#,
            "field `do_layer_norm_before`: expected true or false, found 1",
        ),
    ];
    for (from, to, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        assert!(OPT_125M_CONFIG.contains(from), "{from}");
        std::fs::write(
            dir.path().join("config.json"),
            OPT_125M_CONFIG.replace(from, to),
        )
        .unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json: "), "{err}");
        assert!(err.contains(message), "{err}\nwanted: {message}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{ \"vocab_size\": 3,").unwrap();
    let err = read_config(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json: not valid JSON") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn single_file_with_model_prefix_in_f16() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    write_single(dir.path(), &tensors(&config, Dtype::F16, true, false));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.prefix(), "model.");
    assert_eq!(ckpt.config(), &config);
    assert_eq!(
        ckpt.stored_dtype("decoder.layers.1.fc2.bias"),
        Some(DType::F16)
    );
    assert_loads_everything(&ckpt, DType::F16);
}

#[test]
fn single_file_without_prefix_in_f32_with_projections_and_post_ln() {
    let dir = tempfile::tempdir().unwrap();
    // opt-350m's shape of model: project_in / project_out, post-LN, no final layer norm.
    let config = OptConfig {
        word_embed_proj_dim: 8,
        do_layer_norm_before: false,
        dtype: DType::F32,
        ..tiny()
    };
    write_config(dir.path(), &config);
    write_single(dir.path(), &tensors(&config, Dtype::F32, false, false));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.prefix(), "");
    assert_loads_everything(&ckpt, DType::F32);
}

#[test]
fn sharded_checkpoint_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let config = OptConfig {
        dtype: DType::BF16,
        ..tiny()
    };
    write_config(dir.path(), &config);
    write_sharded(dir.path(), &tensors(&config, Dtype::BF16, true, true), 3);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.files().len(), 3);
    assert!(ckpt.files()[0].ends_with("model-00001-of-00003.safetensors"));
    assert_eq!(ckpt.prefix(), "model.");
    assert_loads_everything(&ckpt, DType::BF16);
}

#[test]
fn untied_head_is_loaded_and_a_missing_one_is_an_error() {
    let config = OptConfig {
        tie_word_embeddings: false,
        ..tiny()
    };
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config);
    let all = tensors(&config, Dtype::F16, true, false);
    assert!(all.contains_key("lm_head.weight"));
    write_single(dir.path(), &all);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_loads_everything(&ckpt, DType::F16);

    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config);
    let mut headless = tensors(&config, Dtype::F16, true, false);
    headless.remove("lm_head.weight");
    write_single(dir.path(), &headless);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, CheckpointError::LmHeadMissing { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("tie_word_embeddings = false"),
        "{err}"
    );
}

#[test]
fn tied_head_present_in_the_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    let mut all = tensors(&config, Dtype::F16, true, true);
    // Even a head of the wrong shape does not matter: the config says it is the embedding.
    all.get_mut("lm_head.weight").unwrap().shape = vec![16, 40];
    write_single(dir.path(), &all);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(!model_tensors(&config)
        .iter()
        .any(|s| s.name == "lm_head.weight"));
    assert_loads_everything(&ckpt, DType::F16);
}

/// Writes the tiny model with `edit` applied to its tensors and returns validate_all's error message.
fn validation_error(edit: impl FnOnce(&mut BTreeMap<String, Raw>)) -> (WeightError, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    let mut all = tensors(&config, Dtype::F16, true, false);
    edit(&mut all);
    write_single(dir.path(), &all);
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .validate_all()
        .unwrap_err();
    let text = err.to_string();
    (err, text)
}

#[test]
fn missing_tensor_names_it_and_its_shape() {
    let (err, text) = validation_error(|t| {
        t.remove("model.decoder.layers.1.fc1.bias");
    });
    assert!(matches!(err, WeightError::Missing { .. }));
    assert!(
        text.contains("`decoder.layers.1.fc1.bias`") && text.contains("[32]"),
        "{text}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_expected_and_found() {
    let (err, text) = validation_error(|t| {
        t.get_mut("model.decoder.layers.0.fc2.weight")
            .unwrap()
            .shape = vec![32, 16];
    });
    assert!(matches!(err, WeightError::Shape { .. }));
    assert!(
        text.contains("`decoder.layers.0.fc2.weight`")
            && text.contains("expected [16, 32], found [32, 16]"),
        "{text}"
    );
}

#[test]
fn unsupported_dtype_names_the_tensor_and_dtype() {
    let (err, text) = validation_error(|t| {
        let raw = t.get_mut("model.decoder.embed_positions.weight").unwrap();
        // I64 needs four times the bytes of f16.
        raw.dtype = Dtype::I64;
        raw.data = vec![0; raw.data.len() * 4];
    });
    assert!(matches!(err, WeightError::DType { .. }));
    assert!(
        text.contains("`decoder.embed_positions.weight`") && text.contains("I64"),
        "{text}"
    );
    assert!(text.contains("float16, bfloat16 and float32"), "{text}");
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    write_single(dir.path(), &tensors(&config, Dtype::F16, true, false));
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    // Cut in the data, inside the header, inside the length prefix, and to nothing at all.
    for keep in [full.len() - 1, full.len() / 2, header_end - 10, 5, 0] {
        std::fs::write(&path, &full[..keep]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "keep {keep}: {err}"
        );
        if keep > header_end {
            assert!(
                err.contains(&format!(
                    "describes {} bytes but the file has only {keep}",
                    full.len()
                )),
                "{err}"
            );
        }
    }
    // Trailing garbage is corrupt too, though not truncated.
    let mut longer = full.clone();
    longer.extend_from_slice(&[0; 3]);
    std::fs::write(&path, &longer).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("3 bytes after the last tensor"), "{err}");
}

#[test]
fn file_shrunk_after_open_is_caught_before_upload() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    write_single(dir.path(), &tensors(&config, Dtype::F16, true, false));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = ckpt.validate_all().unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("changed size"),
        "{err}"
    );
}

#[test]
fn pytorch_bin_only_directory_says_how_to_convert() {
    for files in [
        vec!["pytorch_model.bin"],
        vec![
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        ],
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &tiny());
        for f in &files {
            std::fs::write(dir.path().join(f), b"pickle").unwrap();
        }
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::PytorchOnly { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        for f in &files {
            assert!(text.contains(f), "{text}");
        }
        assert!(
            text.contains(&format!("strata convert '{}'", dir.path().display())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}

#[test]
fn missing_directory_config_or_weights_are_clear_errors() {
    let parent = tempfile::tempdir().unwrap();
    let nowhere = parent.path().join("nowhere");
    let err = Checkpoint::open(&nowhere).unwrap_err().to_string();
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );

    let file = parent.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Checkpoint::open(&file).unwrap_err().to_string();
    assert!(
        err.contains("a-file") && err.contains("not a directory"),
        "{err}"
    );

    let err = Checkpoint::open(parent.path()).unwrap_err();
    assert!(
        matches!(err, CheckpointError::MissingConfig { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("has no config.json"));

    write_config(parent.path(), &tiny());
    let err = Checkpoint::open(parent.path()).unwrap_err().to_string();
    assert!(
        err.contains("has no weights") && err.contains("a-file") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn index_naming_a_missing_shard_or_the_wrong_shard_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny();
    write_config(dir.path(), &config);
    write_sharded(dir.path(), &tensors(&config, Dtype::F16, true, false), 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("`model-00002-of-00002.safetensors`, which is missing"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config);
    write_sharded(dir.path(), &tensors(&config, Dtype::F16, true, false), 2);
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let name = "model.decoder.embed_tokens.weight";
    let other = if map[name] == "model-00001-of-00002.safetensors" {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    map.insert(name.into(), other.into());
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "weight_map puts `{name}` in {other}, but it is in"
        )),
        "{err}"
    );
}

#[test]
fn checkpoint_is_a_weight_source_for_dummy_round_trips() {
    // Weights generated by DummyWeights, written as a checkpoint, read back bit for bit.
    use strata_runtime::dummy::DummyWeights;
    let config = OptConfig {
        dtype: DType::BF16,
        ..tiny()
    };
    let dummy = DummyWeights::new(config);
    let mut all = BTreeMap::new();
    for spec in model_tensors(&config) {
        let t = dummy.load(&spec).unwrap();
        all.insert(
            format!("model.{}", spec.name),
            Raw {
                dtype: Dtype::BF16,
                shape: t.shape.clone(),
                data: t.bytes.into_owned(),
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config);
    write_single(dir.path(), &all);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let source: &dyn WeightSource = &ckpt;
    for spec in model_tensors(&config) {
        assert_eq!(
            source.load(&spec).unwrap().bytes,
            dummy.load(&spec).unwrap().bytes,
            "{}",
            spec.name
        );
    }
}
