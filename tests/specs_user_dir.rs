//! `include_specs!` pointed at a user's own directory (tests/specs/tiny): the generated types, the run-time lookup,
//! and the typed weights loaded from a synthetic weight source.
use std::borrow::Cow;

use strata::typed::{layer_norm, linear, Activations, LoadError, ShapeError};
use strata::{Activation, ModelSpec, OptConfig};
use strata_runtime::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

mod tiny {
    // No `features` option: a user's specs are always compiled in.
    strata::include_specs!("tests/specs/tiny");
}
use tiny::{TinyGalactica, TinyPost, TinyPre};

const _: () = assert!(TinyPre::CONFIG.model_bytes() < 64 << 10);

/// f32 weights whose every element is a known function of tensor and position; one tensor may get a wrong shape.
struct Synthetic {
    config: OptConfig,
    wrong_shape: Option<&'static str>,
}

impl Synthetic {
    fn new(config: OptConfig) -> Self {
        Synthetic {
            config,
            wrong_shape: None,
        }
    }

    /// Element `i` of tensor `name`: distinct per tensor and small, so sums stay exact in f32.
    fn value(name: &str, i: usize) -> f32 {
        let salt = name.bytes().map(usize::from).sum::<usize>() % 7;
        ((i * 3 + salt) % 11) as f32 / 8.0 - 0.5
    }
}

impl WeightSource for Synthetic {
    fn config(&self) -> &OptConfig {
        &self.config
    }

    fn load(&self, spec: &TensorSpec) -> Result<HostTensor<'_>, WeightError> {
        let mut shape = spec.shape.clone();
        if self.wrong_shape == Some(spec.name.as_str()) {
            shape.reverse();
        }
        let values: Vec<f32> = (0..spec.numel())
            .map(|i| Self::value(&spec.name, i))
            .collect();
        Ok(HostTensor {
            dtype: strata::DType::F32,
            shape,
            bytes: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        })
    }
}

#[test]
fn user_specs_generate_types_and_lookup() {
    assert_eq!(
        tiny::ALL.iter().map(|c| c.name).collect::<Vec<_>>(),
        ["tiny-galactica", "tiny-post", "tiny-pre"]
    );
    assert_eq!(
        tiny::resolve("someone/TINY").unwrap().config,
        TinyPre::CONFIG
    );
    assert_eq!(
        tiny::resolve("tiny-iml-post").unwrap().config.name,
        "tiny-iml-post"
    );
    let err = tiny::resolve("opt-125m").unwrap_err();
    assert_eq!(err.known, ["tiny-galactica", "tiny-post", "tiny-pre"]);
    assert_eq!((TinyPre::HEAD_DIM, TinyPre::NUM_POSITIONS), (4, 8));
    assert_eq!(TinyGalactica::CONFIG.activation, Activation::Gelu);
    // Every tensor of the runtime's list is counted in the config's parameters; the typed loader covers them all.
    for c in tiny::ALL {
        let total: usize = model_tensors(c).iter().map(TensorSpec::numel).sum();
        assert_eq!(total as u64, c.params(), "{}", c.name);
    }
}

#[test]
fn typed_weights_load_and_compute() {
    let w = TinyPre::load_weights(&Synthetic::new(TinyPre::CONFIG)).unwrap();
    assert_eq!(w.layers.len(), 2);
    let fc1 = &w.layers[1].fc1;
    assert!(fc1.bias.is_some());
    let expected_w: Vec<f32> = (0..12 * 8)
        .map(|i| Synthetic::value("decoder.layers.1.fc1.weight", i))
        .collect();
    assert_eq!(fc1.weight.to_f32(), expected_w);

    // One token through fc1: the types say 8 in, 12 out.
    let x = Activations::<8>::new((0..8).map(|i| i as f32 - 3.0).collect()).unwrap();
    let y: Activations<12> = linear(fc1, &x);
    for o in 0..12 {
        let mut want = Synthetic::value("decoder.layers.1.fc1.bias", o);
        for i in 0..8 {
            want += expected_w[o * 8 + i] * x.row(0)[i];
        }
        assert!(
            (y.row(0)[o] - want).abs() < 1e-5,
            "output {o}: {} vs {want}",
            y.row(0)[o]
        );
    }
    let back: Activations<8> = linear(&w.layers[1].fc2, &y);
    assert_eq!(back.rows(), 1);
    let normed = layer_norm(&w.final_layer_norm, &back);
    assert_eq!(normed.rows(), 1);
}

#[test]
fn projections_untied_heads_and_bias_free_models_load() {
    let post = TinyPost::load_weights(&Synthetic::new(TinyPost::CONFIG)).unwrap();
    assert!(post.project_in.bias.is_none() && post.project_out.bias.is_none());
    assert_eq!(post.lm_head.to_f32().len(), 20 * 4);
    let gal = TinyGalactica::load_weights(&Synthetic::new(TinyGalactica::CONFIG)).unwrap();
    assert!(gal.layers[0].q_proj.bias.is_none());
    assert!(
        gal.layers[0].self_attn_layer_norm.affine.is_none()
            && gal.final_layer_norm.affine.is_none()
    );
    assert_eq!(gal.final_layer_norm.eps, 1e-5);
}

#[test]
fn a_wrong_shape_in_the_source_is_an_error_naming_the_tensor() {
    let mut source = Synthetic::new(TinyPre::CONFIG);
    source.wrong_shape = Some("decoder.layers.0.fc2.weight");
    let err = TinyPre::load_weights(&source).unwrap_err();
    match &err {
        LoadError::Shape { name, source } => {
            assert_eq!(name, "decoder.layers.0.fc2.weight");
            assert_eq!(
                *source,
                ShapeError::Shape {
                    expected: vec![8, 12],
                    found: vec![12, 8]
                }
            );
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "tensor `decoder.layers.0.fc2.weight`: expected shape [8, 12], found [12, 8]"
    );
}

#[test]
fn weights_of_another_architecture_are_refused() {
    let err = TinyPre::load_weights(&Synthetic::new(TinyPost::CONFIG)).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Architecture {
                field: "word_embed_proj_dim",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("the weights are for `tiny-post` but `tiny-pre` is being loaded"),
        "{err}"
    );
    // Another name and dtype with the same architecture is fine (an -iml checkpoint of the same shapes).
    let renamed = TinyPre::CONFIG
        .with_name("tiny-iml-pre")
        .with_dtype(strata::DType::F16);
    assert!(TinyPre::load_weights(&Synthetic::new(renamed)).is_ok());
}
