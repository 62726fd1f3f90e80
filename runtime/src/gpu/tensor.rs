//! Weights on the GPU: matrices in row chunks that each fit one storage binding, and small f32 vectors.
//!
//! A matrix `[rows, cols]` (a linear layer's `[out, in]`, an embedding table) is split into chunks of whole rows,
//! each its own buffer no larger than [`Gpu::max_binding`]: opt-125m's f32 embedding (154 MB) is two chunks on
//! lavapipe (128 MiB bindings), opt-175b's fp16 fc1 (1.2 GB) fits one chunk on an H200. Kernels loop over chunks.
//!
//! A [`WeightFormat::Packed`] matrix is quantised on the host while loading (one tensor at a time, with
//! [`crate::compress::quantize`]) and each chunk holds its rows as a packed tensor of its own (data section, then
//! scale section, [`crate::compress::PackedLayout`] of `chunk.rows` rows): only the packed words reach the GPU, and
//! the q4_* kernels read them directly. A source that stores the matrix packed already (a packed checkpoint,
//! [`WeightSource::packed`]) skips quantisation: [`GpuMatrix::build_from_source`] slices its words into the same
//! chunks.

use crate::compress::{quantize, CompressionConfig, PackedLayout, PackedRef};
use crate::config::DType;
use crate::gpu::{Gpu, GpuError};
use crate::weights::{HostTensor, TensorSpec, WeightError, WeightSource};

/// How a matrix's elements are stored on the GPU; kernels read every format and accumulate in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// One f32 per element.
    F32,
    /// IEEE halves packed two per u32 (low half first), read with `unpack2x16float`: works on every adapter.
    F16,
    /// Group-wise quantised ([`crate::compress`]'s packed layout), grouped along each row; read by the q4_* kernels.
    Packed(CompressionConfig),
}

impl WeightFormat {
    /// Bytes per element (for a packed format: the data bits rounded up to a byte; use [`WeightFormat::row_bytes`]).
    pub const fn element_bytes(self) -> u64 {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 => 2,
            WeightFormat::Packed(c) => (c.bits as u64).div_ceil(8),
        }
    }

    /// Bytes one row of `cols` elements occupies on the GPU (a packed row counts its data and scale words).
    pub const fn row_bytes(self, cols: usize) -> u64 {
        match self {
            WeightFormat::Packed(c) => PackedLayout::new(1, cols, c).bytes(),
            _ => cols as u64 * self.element_bytes(),
        }
    }

    /// The compression config of a packed format.
    pub const fn compression(self) -> Option<CompressionConfig> {
        match self {
            WeightFormat::Packed(c) => Some(c),
            _ => None,
        }
    }

    /// The storage format for weights stored as `stored`, unless `requested` overrides it. bf16 becomes f32
    /// (exact) since WGSL has no bf16 unpack.
    pub fn choose(stored: DType, requested: Option<DType>) -> WeightFormat {
        match requested.unwrap_or(stored) {
            DType::F16 => WeightFormat::F16,
            DType::F32 | DType::BF16 => WeightFormat::F32,
        }
    }
}

/// Converts little-endian elements of `dtype` to f32.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
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

/// Converts little-endian elements of `dtype` to the bytes of `format`, borrowing when no conversion is needed.
fn to_format(dtype: DType, bytes: &[u8], format: WeightFormat) -> std::borrow::Cow<'_, [u8]> {
    match (dtype, format) {
        (DType::F32, WeightFormat::F32) | (DType::F16, WeightFormat::F16) => bytes.into(),
        (_, WeightFormat::F32) => bytemuck::cast_slice::<f32, u8>(&to_f32(dtype, bytes))
            .to_vec()
            .into(),
        (_, WeightFormat::F16) => to_f32(dtype, bytes)
            .into_iter()
            .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        (_, WeightFormat::Packed(_)) => unreachable!("packed chunks are quantised, not converted"),
    }
}

/// A run of whole rows of a matrix in its own buffer.
#[derive(Debug)]
pub struct MatrixChunk {
    /// First row of the matrix this chunk holds.
    pub row0: usize,
    /// Number of rows.
    pub rows: usize,
    /// The rows, `rows * cols` elements in the matrix's format.
    pub buffer: wgpu::Buffer,
}

/// One row chunk of a matrix converted on the host to its GPU format, handed to [`GpuMatrix::build`]'s `place`.
#[derive(Debug)]
pub struct HostChunk<'a> {
    /// `name[row0..]`: a buffer label, or a file name for a disk home.
    pub label: String,
    /// The chunk's bytes as the GPU buffer holds them (a GPU buffer pads them to a multiple of 4).
    pub bytes: &'a [u8],
}

/// A row-major matrix on the GPU, split into row chunks that each fit one binding.
#[derive(Debug)]
pub struct GpuMatrix {
    /// Rows (a linear layer's output features, an embedding's vocabulary).
    pub rows: usize,
    /// Columns (a linear layer's input features, an embedding's width).
    pub cols: usize,
    /// Element storage.
    pub format: WeightFormat,
    /// The chunks, in row order, covering every row once.
    pub chunks: Vec<MatrixChunk>,
}

impl GpuMatrix {
    /// Uploads a 2-D host tensor named `name` in `format`, splitting it into row chunks of at most
    /// [`Gpu::max_binding`] bytes.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        tensor: &HostTensor<'_>,
        format: WeightFormat,
    ) -> Result<Self, GpuError> {
        Self::build(gpu, name, tensor, format, |chunk| {
            gpu.storage_buffer_init(&chunk.label, chunk.bytes)
        })
    }

    /// Converts a 2-D host tensor to `format` one row chunk at a time (the chunks [`GpuMatrix::upload`] would make)
    /// and hands each chunk's bytes, exactly as the GPU buffer holds them, to `place`, which returns the buffer the
    /// kernels will read for it: the chunk uploaded, or a slot it is streamed into from a CPU or disk home. The host
    /// holds one chunk's converted bytes at a time, so a model is placed tensor by tensor without ever being whole
    /// in memory.
    pub fn build<E: From<GpuError>>(
        gpu: &Gpu,
        name: &str,
        tensor: &HostTensor<'_>,
        format: WeightFormat,
        mut place: impl FnMut(HostChunk<'_>) -> Result<wgpu::Buffer, E>,
    ) -> Result<Self, E> {
        let (rows, cols) = match tensor.shape.as_slice() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            other => {
                return Err(GpuError::Upload(format!(
                    "{name}: expected a matrix, found shape {other:?}"
                ))
                .into())
            }
        };
        let src_elem = tensor.dtype.size_bytes() as usize;
        if tensor.bytes.len() != rows * cols * src_elem {
            return Err(GpuError::Upload(format!(
                "{name}: {} bytes for shape [{rows}, {cols}] of {}",
                tensor.bytes.len(),
                tensor.dtype
            ))
            .into());
        }
        let rows_per_chunk = rows_per_chunk(gpu, name, rows, cols, format)?;
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = rows_per_chunk.min(rows - row0);
            let src = &tensor.bytes[row0 * cols * src_elem..(row0 + n) * cols * src_elem];
            let label = format!("{name}[{row0}..]");
            let buffer = match format {
                // Quantised chunk by chunk: the host holds one chunk's f32 values at a time, the GPU only words.
                WeightFormat::Packed(config) => {
                    let packed = quantize(&to_f32(tensor.dtype, src), n, cols, config)
                        .map_err(|e| GpuError::Upload(format!("{name}: {e}")))?;
                    place(HostChunk {
                        label,
                        bytes: packed.as_bytes(),
                    })?
                }
                _ => place(HostChunk {
                    label,
                    bytes: &to_format(tensor.dtype, src, format),
                })?,
            };
            chunks.push(MatrixChunk {
                row0,
                rows: n,
                buffer,
            });
            row0 += n;
        }
        Ok(GpuMatrix {
            rows,
            cols,
            format,
            chunks,
        })
    }

    /// [`GpuMatrix::build`] for the matrix `spec` of `source`: when `format` is packed and the source stores the
    /// matrix packed ([`WeightSource::packed`]), its words go to `place` as they are, sliced into the same row chunks
    /// (so nothing is quantised again and the buffers are byte for byte what quantising while loading gives);
    /// otherwise the tensor is loaded and converted as [`GpuMatrix::build`] does.
    pub fn build_from_source<E: From<GpuError> + From<WeightError>>(
        gpu: &Gpu,
        source: &dyn WeightSource,
        spec: &TensorSpec,
        format: WeightFormat,
        place: impl FnMut(HostChunk<'_>) -> Result<wgpu::Buffer, E>,
    ) -> Result<Self, E> {
        if let WeightFormat::Packed(config) = format {
            if let Some(packed) = source.packed(spec, config) {
                let packed = packed?;
                if [packed.layout.rows, packed.layout.cols][..] != spec.shape[..] {
                    return Err(WeightError::Shape {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        found: vec![packed.layout.rows, packed.layout.cols],
                    }
                    .into());
                }
                return Self::build_packed(gpu, &spec.name, &packed, place);
            }
        }
        let tensor = source.load(spec)?;
        Self::build(gpu, &spec.name, &tensor, format, place)
    }

    /// [`GpuMatrix::upload`] of the matrix `spec` of `source`, through [`GpuMatrix::build_from_source`].
    pub fn upload_from_source<E: From<GpuError> + From<WeightError>>(
        gpu: &Gpu,
        source: &dyn WeightSource,
        spec: &TensorSpec,
        format: WeightFormat,
    ) -> Result<Self, E> {
        Self::build_from_source(gpu, source, spec, format, |chunk| {
            Ok(gpu.storage_buffer_init(&chunk.label, chunk.bytes)?)
        })
    }

    /// Hands a packed matrix's row chunks to `place`: chunk `[row0, row0 + n)` is those rows' data words followed by
    /// their scale words (a [`PackedLayout`] of `n` rows), exactly what quantising those rows alone gives.
    pub fn build_packed<E: From<GpuError>>(
        gpu: &Gpu,
        name: &str,
        packed: &PackedRef<'_>,
        mut place: impl FnMut(HostChunk<'_>) -> Result<wgpu::Buffer, E>,
    ) -> Result<Self, E> {
        let layout = packed.layout;
        let (rows, cols) = (layout.rows, layout.cols);
        if packed.bytes.len() as u64 != layout.bytes() {
            return Err(GpuError::Upload(format!(
                "{name}: {} packed bytes for shape [{rows}, {cols}], which needs {}",
                packed.bytes.len(),
                layout.bytes()
            ))
            .into());
        }
        let format = WeightFormat::Packed(packed.config);
        let rows_per_chunk = rows_per_chunk(gpu, name, rows, cols, format)?;
        let (data, scales) = packed.bytes.split_at(4 * layout.scale_offset);
        let (data_row, scale_row) = (4 * layout.words_per_row, 4 * layout.groups_per_row);
        let mut bytes = Vec::new();
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = rows_per_chunk.min(rows - row0);
            bytes.clear();
            bytes.extend_from_slice(&data[row0 * data_row..(row0 + n) * data_row]);
            bytes.extend_from_slice(&scales[row0 * scale_row..(row0 + n) * scale_row]);
            let buffer = place(HostChunk {
                label: format!("{name}[{row0}..]"),
                bytes: &bytes,
            })?;
            chunks.push(MatrixChunk {
                row0,
                rows: n,
                buffer,
            });
            row0 += n;
        }
        Ok(GpuMatrix {
            rows,
            cols,
            format,
            chunks,
        })
    }

    /// The packed layout of `chunk` (its own data and scale sections) when the matrix is packed.
    pub fn chunk_layout(&self, chunk: &MatrixChunk) -> Option<PackedLayout> {
        self.format
            .compression()
            .map(|c| PackedLayout::new(chunk.rows, self.cols, c))
    }

    /// Bytes the matrix occupies on the GPU.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buffer.size()).sum()
    }
}

/// Rows per chunk of a `[rows, cols]` matrix in `format`: as many whole rows as one binding holds.
fn rows_per_chunk(
    gpu: &Gpu,
    name: &str,
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Result<usize, GpuError> {
    gpu.check_binding(
        &format!("one row of {name}"),
        format.row_bytes(cols),
        "this adapter cannot hold a single row of this tensor in one binding",
    )?;
    Ok(chunk_rows(gpu.max_binding(), rows, cols, format).unwrap_or(1))
}

/// Rows per chunk of a `[rows, cols]` matrix in `format` when a binding holds `max_binding` bytes: as many whole rows
/// as one binding holds (the last chunk takes the rest); `None` when a single row does not fit. Each chunk's buffer
/// holds `chunk rows * format.row_bytes(cols)` bytes, in whole words.
pub fn chunk_rows(
    max_binding: u64,
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Option<usize> {
    let row_bytes = format.row_bytes(cols);
    (row_bytes <= max_binding)
        .then(|| ((max_binding / row_bytes.max(1)) as usize).clamp(1, rows.max(1)))
}

/// Uploads a vector (bias, layer-norm weight) as f32.
pub fn upload_vector(
    gpu: &Gpu,
    name: &str,
    tensor: &HostTensor<'_>,
) -> Result<wgpu::Buffer, GpuError> {
    let values = vector_values(gpu, name, tensor)?;
    gpu.storage_buffer_init(name, bytemuck::cast_slice(&values))
}

/// A vector's values as its GPU buffer holds them (f32, whatever the stored dtype), checked to fit one binding.
pub fn vector_values(gpu: &Gpu, name: &str, tensor: &HostTensor<'_>) -> Result<Vec<f32>, GpuError> {
    let values = to_f32(tensor.dtype, &tensor.bytes);
    gpu.check_binding(
        name,
        4 * values.len() as u64,
        "vectors must fit one binding",
    )?;
    Ok(values)
}
