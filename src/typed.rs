//! Shape-typed host tensors: each tensor carries its dimensions as const generics, so code that pairs a weight with
//! an input of the wrong width does not compile, and the only way to build one is through a constructor that checks
//! the run-time shape.
//!
//! The generated weight structs (`strata::models::Opt125mWeights`, ...) are made of these types, with the numbers
//! of their spec (`Linear<3072, 768>`), and [`WeightLoader`] fills them from any [`WeightSource`]: the shape is
//! checked once at load time against the file and once at compile time against the code that uses it.
//!
//! [`linear`] and [`layer_norm`] are host reference implementations (f32 arithmetic over f16 / bf16 / f32 storage):
//! they check the typed API end to end and serve tests, not throughput; the GPU runtime does the real work.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use crate::{DType, OptConfig};
use strata_runtime::weights::{model_tensors, HostTensor, TensorSpec, WeightError, WeightSource};

/// A host tensor's shape or size does not match the type it is being put into.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// The shape differs from the type's.
    #[error("expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Shape the type requires.
        expected: Vec<usize>,
        /// Shape of the tensor offered.
        found: Vec<usize>,
    },
    /// The byte length does not match shape and dtype.
    #[error("a {dtype} tensor of shape {shape:?} needs {expected} bytes, found {found}")]
    Bytes {
        /// Element type.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// An activation buffer's length is not a whole number of rows.
    #[error("{len} values are not a whole number of rows of width {width}")]
    Rows {
        /// Row width the type requires.
        width: usize,
        /// Values offered.
        len: usize,
    },
}

/// Checks `tensor` against `expected` and takes ownership of its bytes.
fn checked(tensor: HostTensor<'_>, expected: &[usize]) -> Result<HostTensor<'static>, ShapeError> {
    if tensor.shape != expected {
        return Err(ShapeError::Shape {
            expected: expected.to_vec(),
            found: tensor.shape,
        });
    }
    let want = expected.iter().product::<usize>() * tensor.dtype.size_bytes() as usize;
    if tensor.bytes.len() != want {
        return Err(ShapeError::Bytes {
            dtype: tensor.dtype,
            shape: tensor.shape,
            expected: want,
            found: tensor.bytes.len(),
        });
    }
    Ok(HostTensor {
        dtype: tensor.dtype,
        shape: tensor.shape,
        bytes: Cow::Owned(tensor.bytes.into_owned()),
    })
}

/// An f32 tensor of `shape` (for tests and synthetic weights).
fn from_f32(values: &[f32], shape: Vec<usize>) -> HostTensor<'static> {
    HostTensor {
        dtype: DType::F32,
        shape,
        bytes: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// The elements of a host tensor as f32, whatever its storage dtype.
pub fn to_f32(tensor: &HostTensor<'_>) -> Vec<f32> {
    let bytes: &[u8] = &tensor.bytes;
    match tensor.dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// A `ROWS x COLS` row-major host matrix.
#[derive(Clone, Debug)]
pub struct Matrix<const ROWS: usize, const COLS: usize> {
    tensor: HostTensor<'static>,
}

impl<const ROWS: usize, const COLS: usize> Matrix<ROWS, COLS> {
    /// Takes `tensor` if its shape is exactly `[ROWS, COLS]` and its byte length matches.
    pub fn new(tensor: HostTensor<'_>) -> Result<Self, ShapeError> {
        checked(tensor, &[ROWS, COLS]).map(|tensor| Matrix { tensor })
    }

    /// An f32 matrix from `ROWS * COLS` row-major values.
    pub fn from_f32(values: &[f32]) -> Result<Self, ShapeError> {
        if values.len() != ROWS * COLS {
            return Err(ShapeError::Shape {
                expected: vec![ROWS, COLS],
                found: vec![values.len()],
            });
        }
        Self::new(from_f32(values, vec![ROWS, COLS]))
    }

    /// The underlying host tensor (shape `[ROWS, COLS]`).
    pub fn tensor(&self) -> &HostTensor<'static> {
        &self.tensor
    }

    /// Gives the host tensor back.
    pub fn into_tensor(self) -> HostTensor<'static> {
        self.tensor
    }

    /// The elements as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        to_f32(&self.tensor)
    }
}

/// A host vector of `N` elements.
#[derive(Clone, Debug)]
pub struct Vector<const N: usize> {
    tensor: HostTensor<'static>,
}

impl<const N: usize> Vector<N> {
    /// Takes `tensor` if its shape is exactly `[N]` and its byte length matches.
    pub fn new(tensor: HostTensor<'_>) -> Result<Self, ShapeError> {
        checked(tensor, &[N]).map(|tensor| Vector { tensor })
    }

    /// An f32 vector from `N` values.
    pub fn from_f32(values: &[f32]) -> Result<Self, ShapeError> {
        if values.len() != N {
            return Err(ShapeError::Shape {
                expected: vec![N],
                found: vec![values.len()],
            });
        }
        Self::new(from_f32(values, vec![N]))
    }

    /// The underlying host tensor (shape `[N]`).
    pub fn tensor(&self) -> &HostTensor<'static> {
        &self.tensor
    }

    /// The elements as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        to_f32(&self.tensor)
    }
}

/// A linear layer mapping `IN` features to `OUT`: weight `[OUT, IN]` (Hugging Face's layout) and an optional bias.
#[derive(Clone, Debug)]
pub struct Linear<const OUT: usize, const IN: usize> {
    /// The `[OUT, IN]` weight.
    pub weight: Matrix<OUT, IN>,
    /// The bias, absent in models without biases (Galactica) and in project_in / project_out.
    pub bias: Option<Vector<OUT>>,
}

/// A layer norm over `N` features, with or without its elementwise affine weight and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm<const N: usize> {
    /// `(weight, bias)`, absent where `layer_norm_elementwise_affine` is false.
    pub affine: Option<(Vector<N>, Vector<N>)>,
    /// Epsilon added to the variance.
    pub eps: f32,
}

/// A batch of activations: any number of rows (tokens) of width `N`, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations<const N: usize> {
    values: Vec<f32>,
}

impl<const N: usize> Activations<N> {
    /// Rows of width `N`, row-major; the length must be a multiple of `N`.
    pub fn new(values: Vec<f32>) -> Result<Self, ShapeError> {
        if N == 0 || values.len() % N != 0 {
            return Err(ShapeError::Rows {
                width: N,
                len: values.len(),
            });
        }
        Ok(Activations { values })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len() / N
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * N..(i + 1) * N]
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }
}

/// `y = x W^T + b` for every row of `x`. The widths are in the types: `x` must have `IN` columns, `y` has `OUT`.
pub fn linear<const OUT: usize, const IN: usize>(
    layer: &Linear<OUT, IN>,
    x: &Activations<IN>,
) -> Activations<OUT> {
    let w = layer.weight.to_f32();
    let b = layer.bias.as_ref().map(Vector::to_f32);
    let mut out = Vec::with_capacity(x.rows() * OUT);
    for r in 0..x.rows() {
        let row = x.row(r);
        for o in 0..OUT {
            let dot: f32 = w[o * IN..(o + 1) * IN]
                .iter()
                .zip(row)
                .map(|(a, b)| a * b)
                .sum();
            out.push(dot + b.as_ref().map_or(0.0, |b| b[o]));
        }
    }
    Activations { values: out }
}

/// Layer norm of every row: `(x - mean) / sqrt(var + eps)`, then `* weight + bias` where the norm is affine.
pub fn layer_norm<const N: usize>(norm: &LayerNorm<N>, x: &Activations<N>) -> Activations<N> {
    let affine = norm.affine.as_ref().map(|(w, b)| (w.to_f32(), b.to_f32()));
    let mut out = Vec::with_capacity(x.values.len());
    for r in 0..x.rows() {
        let row = x.row(r);
        let mean = row.iter().sum::<f32>() / N as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / N as f32;
        let inv = 1.0 / (var + norm.eps).sqrt();
        for (i, v) in row.iter().enumerate() {
            let y = (v - mean) * inv;
            out.push(match &affine {
                Some((w, b)) => y * w[i] + b[i],
                None => y,
            });
        }
    }
    Activations { values: out }
}

/// Why typed weights could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The source could not provide a tensor.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// A tensor does not fit its typed field.
    #[error("tensor `{name}`: {source}")]
    Shape {
        /// Canonical tensor name.
        name: String,
        /// What does not fit.
        #[source]
        source: ShapeError,
    },
    /// The source holds another architecture than the model type being loaded.
    #[error(
        "the weights are for `{found_model}` but `{model}` is being loaded: {field} is {found} there, {expected} here; \
         pick the model type matching the checkpoint"
    )]
    Architecture {
        /// The model type being loaded.
        model: &'static str,
        /// The source's model.
        found_model: &'static str,
        /// First differing field.
        field: &'static str,
        /// Its value in the model type.
        expected: String,
        /// Its value in the source.
        found: String,
    },
    /// The typed struct asked for a tensor the runtime's list (`model_tensors`) does not have: the generated code
    /// and the runtime disagree (a bug in strata, not in the checkpoint).
    #[error("`{name}` is not in the tensor list of `{model}` (strata's generated weights and runtime disagree)")]
    NotInTensorList {
        /// The model.
        model: &'static str,
        /// The tensor asked for.
        name: String,
    },
    /// The typed struct left tensors of the runtime's list unloaded (a bug in strata, not in the checkpoint).
    #[error(
        "the typed weights of `{model}` do not cover {names:?} from the runtime's tensor list"
    )]
    Unloaded {
        /// The model.
        model: &'static str,
        /// The tensors never loaded.
        names: Vec<String>,
    },
}

/// Fills typed weight structs from a [`WeightSource`], tensor by tensor, with the names and shapes of
/// [`model_tensors`]; it remembers what was loaded so [`WeightLoader::finish`] can prove nothing was missed.
pub struct WeightLoader<'a> {
    source: &'a dyn WeightSource,
    model: &'static str,
    eps: f32,
    expected: HashMap<String, TensorSpec>,
    loaded: BTreeSet<String>,
}

impl<'a> WeightLoader<'a> {
    /// A loader for the model `config` over `source`, which must describe the same architecture (name and dtype
    /// may differ: an `opt-iml-30b` checkpoint loads as `Opt30b`; tensors arrive in the dtype stored).
    pub fn new(source: &'a dyn WeightSource, config: &OptConfig) -> Result<Self, LoadError> {
        let found = source.config();
        if let Some((field, expected, got)) = first_difference(config, found) {
            return Err(LoadError::Architecture {
                model: config.name,
                found_model: found.name,
                field,
                expected,
                found: got,
            });
        }
        let expected = model_tensors(config)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        Ok(WeightLoader {
            source,
            model: config.name,
            eps: config.layer_norm_eps,
            expected,
            loaded: BTreeSet::new(),
        })
    }

    fn tensor<T>(
        &mut self,
        name: &str,
        wrap: impl FnOnce(HostTensor<'_>) -> Result<T, ShapeError>,
    ) -> Result<T, LoadError> {
        let spec = self
            .expected
            .get(name)
            .ok_or_else(|| LoadError::NotInTensorList {
                model: self.model,
                name: name.to_owned(),
            })?;
        let tensor = self.source.load(spec)?;
        let typed = wrap(tensor).map_err(|source| LoadError::Shape {
            name: name.to_owned(),
            source,
        })?;
        self.loaded.insert(name.to_owned());
        Ok(typed)
    }

    /// The matrix `name`, checked to be `[ROWS, COLS]`.
    pub fn matrix<const ROWS: usize, const COLS: usize>(
        &mut self,
        name: &str,
    ) -> Result<Matrix<ROWS, COLS>, LoadError> {
        self.tensor(name, Matrix::new)
    }

    /// The vector `name`, checked to be `[N]`.
    pub fn vector<const N: usize>(&mut self, name: &str) -> Result<Vector<N>, LoadError> {
        self.tensor(name, Vector::new)
    }

    /// The linear layer `{prefix}.weight` (+ `{prefix}.bias` where the tensor list has one).
    pub fn linear<const OUT: usize, const IN: usize>(
        &mut self,
        prefix: &str,
    ) -> Result<Linear<OUT, IN>, LoadError> {
        let weight = self.matrix(&format!("{prefix}.weight"))?;
        let bias_name = format!("{prefix}.bias");
        let bias = if self.expected.contains_key(&bias_name) {
            Some(self.vector(&bias_name)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// The layer norm `prefix`: its weight and bias where the tensor list has them, the config's epsilon.
    pub fn layer_norm<const N: usize>(&mut self, prefix: &str) -> Result<LayerNorm<N>, LoadError> {
        let weight_name = format!("{prefix}.weight");
        let affine = if self.expected.contains_key(&weight_name) {
            Some((
                self.vector(&weight_name)?,
                self.vector(&format!("{prefix}.bias"))?,
            ))
        } else {
            None
        };
        Ok(LayerNorm {
            affine,
            eps: self.eps,
        })
    }

    /// Checks that every tensor of the model's list was loaded.
    pub fn finish(self) -> Result<(), LoadError> {
        let mut names: Vec<String> = self
            .expected
            .into_keys()
            .filter(|name| !self.loaded.contains(name))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        Err(LoadError::Unloaded {
            model: self.model,
            names,
        })
    }
}

/// The first field (other than name and dtype) in which two configs differ.
fn first_difference(a: &OptConfig, b: &OptConfig) -> Option<(&'static str, String, String)> {
    macro_rules! compare {
        ($($field:ident),*) => {
            $(if a.$field != b.$field {
                return Some((stringify!($field), format!("{:?}", a.$field), format!("{:?}", b.$field)));
            })*
        };
    }
    compare!(
        num_hidden_layers,
        hidden_size,
        n_head,
        ffn_embed_dim,
        word_embed_proj_dim,
        vocab_size,
        max_seq_len,
        activation,
        do_layer_norm_before,
        enable_bias,
        layer_norm_elementwise_affine,
        remove_final_layer_norm,
        tie_word_embeddings
    );
    None
}

/// Turns the loaded layers into the fixed-size array the typed struct holds.
pub fn boxed_array<T, const N: usize>(
    items: Vec<T>,
    model: &'static str,
) -> Result<Box<[T; N]>, LoadError> {
    let len = items.len();
    items
        .into_boxed_slice()
        .try_into()
        .map_err(|_| LoadError::Unloaded {
            model,
            names: vec![format!("{N} decoder layers (got {len})")],
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_check_shape_and_bytes() {
        let ok = from_f32(&[1.0; 6], vec![2, 3]);
        assert!(Matrix::<2, 3>::new(ok.clone()).is_ok());
        assert_eq!(
            Matrix::<3, 2>::new(ok).unwrap_err(),
            ShapeError::Shape {
                expected: vec![3, 2],
                found: vec![2, 3]
            }
        );
        let short = HostTensor {
            dtype: DType::F16,
            shape: vec![4],
            bytes: Cow::Owned(vec![0; 6]),
        };
        assert!(matches!(
            Vector::<4>::new(short),
            Err(ShapeError::Bytes {
                expected: 8,
                found: 6,
                ..
            })
        ));
        assert!(Activations::<3>::new(vec![0.0; 7]).is_err());
    }

    #[test]
    fn linear_matches_a_hand_computation() {
        // W = [[1, 2, 3], [4, 5, 6]], b = [0.5, -1], x = [1, 0, -1] and [2, 1, 0].
        let layer = Linear::<2, 3> {
            weight: Matrix::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
            bias: Some(Vector::from_f32(&[0.5, -1.0]).unwrap()),
        };
        let x = Activations::<3>::new(vec![1.0, 0.0, -1.0, 2.0, 1.0, 0.0]).unwrap();
        let y = linear(&layer, &x);
        assert_eq!(
            y.as_slice(),
            [
                1.0 - 3.0 + 0.5,
                4.0 - 6.0 - 1.0,
                2.0 + 2.0 + 0.5,
                8.0 + 5.0 - 1.0
            ]
        );
    }

    #[test]
    fn f16_and_bf16_storage_read_back_exactly() {
        let halves = HostTensor {
            dtype: DType::F16,
            shape: vec![2],
            bytes: Cow::Owned(
                [half::f16::from_f32(1.5), half::f16::from_f32(-0.25)]
                    .iter()
                    .flat_map(|h| h.to_le_bytes())
                    .collect(),
            ),
        };
        assert_eq!(Vector::<2>::new(halves).unwrap().to_f32(), [1.5, -0.25]);
        let brains = HostTensor {
            dtype: DType::BF16,
            shape: vec![1],
            bytes: Cow::Owned(half::bf16::from_f32(3.0).to_le_bytes().to_vec()),
        };
        assert_eq!(Vector::<1>::new(brains).unwrap().to_f32(), [3.0]);
    }

    #[test]
    fn layer_norm_normalises_each_row() {
        let plain = LayerNorm::<4> {
            affine: None,
            eps: 0.0,
        };
        let x = Activations::<4>::new(vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let y = layer_norm(&plain, &x);
        // mean 2.5, variance 1.25.
        let s = 1.25f32.sqrt();
        let expected = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s];
        for (a, b) in y.as_slice().iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let affine = LayerNorm::<4> {
            affine: Some((
                Vector::from_f32(&[2.0; 4]).unwrap(),
                Vector::from_f32(&[1.0; 4]).unwrap(),
            )),
            eps: 0.0,
        };
        let z = layer_norm(&affine, &x);
        assert!((z.as_slice()[0] - (2.0 * expected[0] + 1.0)).abs() < 1e-6);
    }
}
