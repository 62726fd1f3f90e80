//! A packed checkpoint is only used with the weights it was packed from: a file made before the model's linear weights
//! changed (a fine-tune, a merged adapter, a new download of the same architecture) is refused with advice, even for a
//! model without biases or layer-norm weights; so is one packed by another strata. Broken packed files say what to do.

mod common;

use std::path::Path;

use common::{fixture, generate_command};
use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::checkpoint::{write_packed_model, PackedWeights};
use strata_runtime::compress::CompressionConfig;
use strata_runtime::config::OptConfig;
use strata_runtime::weights::{HostTensor, TensorSpec, WeightError, WeightSource};

/// No biases, no layer-norm weights: every tensor but the embeddings is a packed matrix.
const NO_BIAS: &str = "gelu-no-bias";

/// `inner` with the lowest byte of one element of `changed` flipped: the same architecture, other weights.
struct Changed<'a> {
    inner: &'a dyn WeightSource,
    changed: &'a str,
}

impl WeightSource for Changed<'_> {
    fn config(&self) -> &OptConfig {
        self.inner.config()
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let tensor = self.inner.load(spec)?;
        if spec.name != self.changed {
            return Ok(tensor);
        }
        let mut bytes = tensor.bytes.into_owned();
        bytes[0] ^= 1;
        Ok(HostTensor {
            bytes: bytes.into(),
            ..tensor
        })
    }
}

#[test]
fn a_file_packed_from_other_weights_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.packed");
    let checkpoint = Checkpoint::open(fixture(NO_BIAS).0).unwrap();
    let packing = CompressionConfig::DEFAULT;
    write_packed_model(&path, &checkpoint, packing).unwrap();
    let packed = PackedWeights::open(&path, checkpoint.config(), packing).unwrap();
    packed.check_source(&checkpoint).unwrap();
    for name in [
        "decoder.layers.1.fc2.weight",
        "decoder.layers.0.self_attn.q_proj.weight",
        "decoder.embed_positions.weight",
    ] {
        let changed = Changed {
            inner: &checkpoint,
            changed: name,
        };
        let err = packed.check_source(&changed).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{name}` has changed")) && err.contains("delete the file"),
            "{err}"
        );
    }
}

#[test]
fn a_file_packed_by_another_strata_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.packed");
    let checkpoint = Checkpoint::open(fixture(NO_BIAS).0).unwrap();
    let packing = CompressionConfig::DEFAULT;
    write_packed_model(&path, &checkpoint, packing).unwrap();
    // The same header with another version of the same length: only the recorded tool differs.
    let ours = format!("strata {}", env!("CARGO_PKG_VERSION"));
    let theirs = format!("strata {}", "9".repeat(env!("CARGO_PKG_VERSION").len()));
    let bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(ours.len())
        .position(|w| w == ours.as_bytes())
        .expect("the header records the version");
    let mut edited = bytes.clone();
    edited[at..at + ours.len()].copy_from_slice(theirs.as_bytes());
    std::fs::write(&path, edited).unwrap();
    let packed = PackedWeights::open(&path, checkpoint.config(), packing).unwrap();
    let err = packed.check_source(&checkpoint).unwrap_err().to_string();
    assert!(
        err.contains(&format!("packed by {theirs}, this is {ours}")),
        "{err}"
    );
}

/// Copies the fixture `name` into `to`.
fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fixture(name).0).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Flips the lowest byte of the first element of tensor `name` (as stored) wherever it is among `dir`'s shards.
fn change_tensor(dir: &Path, name: &str) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        if let Some(start) = header[name]["data_offsets"][0].as_u64() {
            bytes[8 + n + start as usize] ^= 1;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("no tensor {name} in {}", dir.display());
}

#[test]
fn the_cli_refuses_a_packed_file_whose_model_changed_since() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_fixture(NO_BIAS, &model);
    let packed = tmp.path().join("model-q4.safetensors");
    let prompts = fixture(NO_BIAS).1;
    let run = || {
        let mut cmd = generate_command(&model, &prompts, 2);
        cmd.args(["--compress-weight", "--packed-weights"])
            .arg(&packed);
        cmd.output().unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(run().status.success(), "an unchanged model reuses the file");
    // A fine-tune of one linear layer: same architecture, same (absent) biases and norms.
    change_tensor(&model, "model.decoder.layers.1.fc1.weight");
    let stale = run();
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success(), "a stale packed file was used");
    assert!(
        stderr.contains("`decoder.layers.1.fc1.weight` has changed since the file was packed")
            && stderr.contains("delete the file"),
        "{stderr}"
    );
}

#[test]
fn broken_packed_files_are_named_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, prompts, _) = fixture("pre-ln-relu");
    let packed = tmp.path().join("model-q4.safetensors");
    let run = |path: &Path| {
        let mut cmd = generate_command(&dir, &prompts, 2);
        cmd.args(["--compress-weight", "--packed-weights"])
            .arg(path);
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A directory: named as such, before the GPU is opened.
    let stderr = run(tmp.path());
    assert!(
        stderr.contains("is a directory") && !stderr.contains("os error"),
        "{stderr}"
    );
    // A write cut short (the rename happened, the data did not all arrive): truncated, delete and rebuild.
    let checkpoint = Checkpoint::open(&dir).unwrap();
    write_packed_model(&packed, &checkpoint, CompressionConfig::DEFAULT).unwrap();
    let full = std::fs::read(&packed).unwrap();
    std::fs::write(&packed, &full[..full.len() / 2]).unwrap();
    let stderr = run(&packed);
    assert!(
        stderr.contains("truncated") && stderr.contains("Delete it and run again"),
        "{stderr}"
    );
    // Random bytes: not a safetensors file at all.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&packed, &noise).unwrap();
    let stderr = run(&packed);
    assert!(
        stderr.contains("not a safetensors file") && !stderr.contains("truncated"),
        "{stderr}"
    );
}
