//! Packed checkpoints as a weight source (`--packed-weights`): loading from a file that `write_packed_model` wrote
//! gives the GPU exactly the buffers quantising while loading gives, so generation is bit for bit the same; a file
//! packed with other settings or for another model is refused by name; the CLI writes the file once and reuses it.

mod common;

use common::{fixture, generate_command, gpu, options};

use std::path::{Path, PathBuf};

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::checkpoint::{write_packed_model, PackedWeights};
use strata_runtime::compress::CompressionConfig;
use strata_runtime::compress::PackedRef;
use strata_runtime::config::OptConfig;
use strata_runtime::generate::{GenerateOutput, Generator};
use strata_runtime::gpu::tensor::{GpuMatrix, WeightFormat};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::policy::{Percent, Policy};
use strata_runtime::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

/// A packed checkpoint that refuses to serve a matrix as numbers: loading through it proves nothing is quantised.
struct WordsOnly<'a>(&'a PackedWeights);

impl WeightSource for WordsOnly<'_> {
    fn config(&self) -> &OptConfig {
        self.0.config()
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        assert!(
            spec.shape.len() == 1,
            "`{}` was loaded as numbers, not served packed",
            spec.name
        );
        self.0.load(spec)
    }

    fn packed(
        &self,
        spec: &TensorSpec,
        config: CompressionConfig,
    ) -> Option<Result<PackedRef<'_>, WeightError>> {
        self.0.packed(spec, config)
    }
}

/// An f32 fixture (hidden 32, ffn 128, vocab 256, two layers).
const FIXTURE: &str = "pre-ln-relu";

fn fixture_dir() -> PathBuf {
    fixture(FIXTURE).0
}

fn prompts() -> Vec<Vec<u32>> {
    fixture(FIXTURE).1
}

/// The generated ids and every step's logits (not the timings).
fn generate(gen: &Generator) -> (Vec<Vec<u32>>, Vec<f32>) {
    let out: GenerateOutput = gen.generate(&prompts(), &options(4)).unwrap();
    (out.generated_ids, out.logits.unwrap())
}

/// Asserts bit-for-bit equal outputs, naming the first logit that differs instead of printing them all.
fn assert_same(a: &(Vec<Vec<u32>>, Vec<f32>), b: &(Vec<Vec<u32>>, Vec<f32>), what: &str) {
    assert_eq!(a.0, b.0, "{what}: generated ids");
    assert_eq!(a.1.len(), b.1.len(), "{what}: logits");
    if let Some(i) = (0..a.1.len()).find(|&i| a.1[i].to_bits() != b.1[i].to_bits()) {
        panic!("{what}: logit {i} is {} vs {}", a.1[i], b.1[i]);
    }
}

/// Weights on the CPU, cache and activations on the GPU, weights packed under `packing`.
fn cpu_weights_policy(packing: CompressionConfig, batch: usize, dir: &Path) -> Policy {
    Policy {
        gpu_batch_size: batch,
        num_gpu_batches: 1,
        percent: Percent::from_array([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]),
        compress_weight: true,
        compress_weight_config: packing,
        offload_dir: Some(dir.to_path_buf()),
        ..Policy::default()
    }
}

fn write_fixture(packing: CompressionConfig, path: &Path) -> Checkpoint {
    let checkpoint = Checkpoint::open(fixture_dir()).unwrap();
    write_packed_model(path, &checkpoint, packing).unwrap();
    checkpoint
}

#[test]
fn a_packed_file_generates_exactly_what_quantising_while_loading_does() {
    let gpu = gpu();
    let tmp = tempfile::tempdir().unwrap();
    // Default 4/64 pads every 32-wide row's group; 8 bits in groups of 32 splits fc2's 128-wide rows.
    for packing in [
        CompressionConfig::DEFAULT,
        CompressionConfig::new(8, 32).unwrap(),
    ] {
        let path = tmp
            .path()
            .join(format!("{}-{}.packed", packing.bits, packing.group_size));
        let checkpoint = write_fixture(packing, &path);
        let packed = PackedWeights::open(&path, checkpoint.config(), packing).unwrap();
        let batch = prompts().len();
        let all_gpu = Policy {
            gpu_batch_size: batch,
            compress_weight: true,
            compress_weight_config: packing,
            ..Policy::default()
        };
        let load = |source: &dyn WeightSource, policy: &Policy| {
            Generator::with_policy(&gpu, source, policy, &|_| {}).unwrap()
        };

        let quantised = generate(&load(&checkpoint, &all_gpu));
        let loaded = generate(&load(&packed, &all_gpu));
        assert_same(&loaded, &quantised, &format!("all GPU, {packing:?}"));
        // The all-GPU upload takes every matrix as packed words.
        load(&WordsOnly(&packed), &all_gpu);

        // Offloaded placement (LayerStore) takes the file's words too, straight into the CPU tier.
        let policy = cpu_weights_policy(packing, batch, tmp.path());
        let offloaded_quantised = generate(&load(&checkpoint, &policy));
        let offloaded_loaded = generate(&load(&packed, &policy));
        assert_same(
            &offloaded_loaded,
            &offloaded_quantised,
            &format!("weights on CPU, {packing:?}"),
        );
        load(&WordsOnly(&packed), &policy);
    }
}

#[test]
fn packed_words_are_sliced_into_the_same_row_chunks_as_quantising_gives() {
    // 256-byte bindings: fc1 (128 rows of 36 bytes at 4/64) is 19 chunks of 7 rows.
    let gpu = Gpu::new(&GpuOptions {
        adapter: None,
        max_binding_override: Some(256),
    })
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let packing = CompressionConfig::DEFAULT;
    let path = tmp.path().join("model.packed");
    let checkpoint = write_fixture(packing, &path);
    let packed = PackedWeights::open(&path, checkpoint.config(), packing).unwrap();
    let format = WeightFormat::Packed(packing);
    let specs = model_tensors(checkpoint.config());
    for name in [
        "decoder.layers.0.fc1.weight",
        "decoder.layers.1.fc2.weight",
        "decoder.layers.1.self_attn.q_proj.weight",
    ] {
        let spec = specs.iter().find(|s| s.name == name).unwrap();
        let mut chunks = Vec::new();
        for source in [&checkpoint as &dyn WeightSource, &packed] {
            let mut out = Vec::new();
            let matrix = GpuMatrix::build_from_source::<strata_runtime::model::ModelError>(
                &gpu,
                source,
                spec,
                format,
                |chunk| {
                    out.push((chunk.label.clone(), chunk.bytes.to_vec()));
                    Ok(gpu.storage_buffer_init(&chunk.label, chunk.bytes)?)
                },
            )
            .unwrap();
            assert_eq!([matrix.rows, matrix.cols][..], spec.shape[..]);
            chunks.push(out);
        }
        assert!(chunks[0].len() > 1, "{name} must span several chunks");
        assert_eq!(chunks[1], chunks[0], "{name}");
    }
}

#[test]
fn a_file_packed_with_other_settings_or_for_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.packed");
    let checkpoint = write_fixture(CompressionConfig::new(4, 32).unwrap(), &path);
    let err = PackedWeights::open(&path, checkpoint.config(), CompressionConfig::DEFAULT)
        .err()
        .expect("groups of 32 are not groups of 64")
        .to_string();
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("4 bits in groups of 32")
            && err.contains("4 bits in groups of 64"),
        "{err}"
    );

    // The same file for a model with one more layer: the config asks for tensors the file lacks.
    let mut bigger = *checkpoint.config();
    bigger.num_hidden_layers += 1;
    let packing = CompressionConfig::new(4, 32).unwrap();
    let err = PackedWeights::open(&path, &bigger, packing)
        .err()
        .expect("another model")
        .to_string();
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("decoder.layers.2.")
            && err.contains("another model"),
        "{err}"
    );
    // The same architecture with other weights (synthetic ones): the shared biases and norms tell them apart.
    let packed = PackedWeights::open(&path, checkpoint.config(), packing).unwrap();
    packed.check_source(&checkpoint).unwrap();
    let other = strata_runtime::dummy::DummyWeights::new(*checkpoint.config());
    let err = packed.check_source(&other).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("other weights"),
        "{err}"
    );
    // One layer fewer: the file has tensors the model does not.
    let mut smaller = *checkpoint.config();
    smaller.num_hidden_layers -= 1;
    let err = PackedWeights::open(&path, &smaller, packing)
        .err()
        .expect("another model")
        .to_string();
    assert!(
        err.contains("decoder.layers.1.") && err.contains("another model"),
        "{err}"
    );
}

fn cli(packed: &Path, extra: &[&str], npy: &Path) -> std::process::Output {
    let mut cmd = generate_command(&fixture_dir(), &prompts(), 3);
    cmd.args(extra)
        .arg("--packed-weights")
        .arg(packed)
        .arg("--dump-logits")
        .arg(npy);
    cmd.output().unwrap()
}

#[test]
fn the_cli_writes_the_packed_file_once_and_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let packed = tmp.path().join("model.packed");
    let compress = ["--compress-weight", "--compress-weight-group-size", "32"];
    let run = |npy: &str| {
        let npy = tmp.path().join(npy);
        let out = cli(&packed, &compress, &npy);
        assert!(
            out.status.success(),
            "strata generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = json["generated_ids"].clone();
        (ids, strata_runtime::npy::read_f32(&npy).unwrap().data)
    };
    let first = run("first.npy");
    let meta = std::fs::metadata(&packed).expect("the first run writes the file");
    let written = (meta.len(), meta.modified().unwrap());
    let second = run("second.npy");
    let meta = std::fs::metadata(&packed).unwrap();
    assert_eq!(
        (meta.len(), meta.modified().unwrap()),
        written,
        "the second run reads the file, it does not write it again"
    );
    assert_eq!(second, first);
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");

    // Quantising while loading (no file) gives the same output.
    let npy = tmp.path().join("direct.npy");
    let out = generate_command(&fixture_dir(), &prompts(), 3)
        .args(compress)
        .arg("--dump-logits")
        .arg(&npy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            json["generated_ids"].clone(),
            strata_runtime::npy::read_f32(&npy).unwrap().data
        ),
        first
    );

    // Other settings than the file's: refused, naming the file.
    let out = cli(&packed, &["--compress-weight"], &tmp.path().join("x.npy"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("model.packed") && err.contains("groups of 32"),
        "{err}"
    );
    // The same architecture's synthetic weights: the file was packed from other weights.
    let mut dummy = compress.to_vec();
    dummy.push("--dummy");
    let out = cli(&packed, &dummy, &tmp.path().join("z.npy"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("other weights"),
        "{err}"
    );
    // Without --compress-weight the flag says what to add.
    let out = cli(&packed, &[], &tmp.path().join("y.npy"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("add --compress-weight"),
        "{err}"
    );
}
