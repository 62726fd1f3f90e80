//! Dtype conversion of host tensors for the GPU upload: to f32, or to f16 bit patterns.
//!
//! Tensor bytes come from a memory map at arbitrary offsets, so they are read as little-endian byte pairs/quads
//! (never reinterpreted in place, which would need alignment) into a small buffer, then converted with `half`'s slice
//! routines (SIMD where the CPU has it). Large tensors are split across rayon's threads.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::config::DType;
use crate::weights::HostTensor;

/// Elements converted per task (and per stack buffer).
const CHUNK: usize = 4096;
/// Below this many elements the work stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 17;

/// The tensor's elements as f32. Trailing bytes that do not form a whole element are ignored.
pub fn to_f32(tensor: &HostTensor<'_>) -> Vec<f32> {
    let src: &[u8] = &tensor.bytes;
    match tensor.dtype {
        DType::F32 => convert(src, 4, |bytes, out: &mut [f32]| read_f32s(bytes, out)),
        DType::F16 => convert(src, 2, |bytes, out: &mut [f32]| {
            let mut bits = [0u16; CHUNK];
            let bits = &mut bits[..out.len()];
            read_u16s(bytes, bits);
            bytemuck::cast_slice::<u16, f16>(bits).convert_to_f32_slice(out);
        }),
        DType::BF16 => convert(src, 2, |bytes, out: &mut [f32]| {
            let mut bits = [0u16; CHUNK];
            let bits = &mut bits[..out.len()];
            read_u16s(bytes, bits);
            bytemuck::cast_slice::<u16, bf16>(bits).convert_to_f32_slice(out);
        }),
    }
}

/// The tensor's elements as IEEE f16 bit patterns (rounded to nearest even from f32 or bf16).
pub fn to_f16_bits(tensor: &HostTensor<'_>) -> Vec<u16> {
    let src: &[u8] = &tensor.bytes;
    match tensor.dtype {
        DType::F16 => convert(src, 2, read_u16s),
        DType::F32 => convert(src, 4, |bytes, out: &mut [u16]| {
            let mut wide = [0f32; CHUNK];
            let wide = &mut wide[..out.len()];
            read_f32s(bytes, wide);
            bytemuck::cast_slice_mut::<u16, f16>(out).convert_from_f32_slice(wide);
        }),
        DType::BF16 => convert(src, 2, |bytes, out: &mut [u16]| {
            let mut bits = [0u16; CHUNK];
            let bits = &mut bits[..out.len()];
            read_u16s(bytes, bits);
            let mut wide = [0f32; CHUNK];
            let wide = &mut wide[..out.len()];
            bytemuck::cast_slice::<u16, bf16>(bits).convert_to_f32_slice(wide);
            bytemuck::cast_slice_mut::<u16, f16>(out).convert_from_f32_slice(wide);
        }),
    }
}

/// Runs `chunk(bytes, out)` over `CHUNK`-element pieces of the output, in parallel for large tensors.
fn convert<T, F>(src: &[u8], elem_bytes: usize, chunk: F) -> Vec<T>
where
    T: Copy + Default + Send,
    F: Fn(&[u8], &mut [T]) + Sync,
{
    let n = src.len() / elem_bytes;
    let mut out = vec![T::default(); n];
    let run = |(i, piece): (usize, &mut [T])| {
        let start = i * CHUNK * elem_bytes;
        chunk(&src[start..start + piece.len() * elem_bytes], piece);
    };
    if n >= PARALLEL_MIN {
        out.par_chunks_mut(CHUNK).enumerate().for_each(run);
    } else {
        out.chunks_mut(CHUNK).enumerate().for_each(run);
    }
    out
}

fn read_u16s(bytes: &[u8], out: &mut [u16]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = u16::from_le_bytes([b[0], b[1]]);
    }
}

fn read_f32s(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn tensor(dtype: DType, bytes: Vec<u8>) -> HostTensor<'static> {
        let n = bytes.len() / dtype.size_bytes() as usize;
        HostTensor {
            dtype,
            shape: vec![n],
            bytes: Cow::Owned(bytes),
        }
    }

    /// Values exactly representable in f16, bf16 and f32, so every conversion must reproduce them bit for bit.
    fn exact_values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i % 509) as f32 - 254.0) * 0.25).collect()
    }

    #[test]
    fn every_dtype_converts_exactly_small_and_parallel() {
        for n in [0, 1, 7, CHUNK + 3, PARALLEL_MIN + 5] {
            let values = exact_values(n);
            let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let f16_bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let bf16_bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let f16_bits: Vec<u16> = values.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
            for (dtype, bytes) in [
                (DType::F32, &f32_bytes),
                (DType::F16, &f16_bytes),
                (DType::BF16, &bf16_bytes),
            ] {
                let t = tensor(dtype, bytes.clone());
                assert_eq!(to_f32(&t), values, "{dtype} -> f32, n = {n}");
                assert_eq!(to_f16_bits(&t), f16_bits, "{dtype} -> f16, n = {n}");
            }
        }
    }

    #[test]
    fn unaligned_bytes_are_read_correctly() {
        let values = exact_values(1000);
        let mut raw = vec![0u8];
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        // A view starting at an odd address, as a tensor inside a mapped file can.
        let t = HostTensor {
            dtype: DType::F32,
            shape: vec![1000],
            bytes: Cow::Borrowed(&raw[1..]),
        };
        assert_eq!(to_f32(&t), values);
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between f16 1.0 and its successor: ties go to the even mantissa (1.0).
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: goes to 1 + 2^-9.
        let inputs = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 70000.0];
        let bytes: Vec<u8> = inputs.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = to_f16_bits(&tensor(DType::F32, bytes));
        assert_eq!(got, vec![0x3C00, 0x3C02, 0x7C00]);
    }
}
