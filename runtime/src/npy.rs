//! float32 `.npy` files (NumPy's format, version 1.0): what `strata generate --dump-logits` writes and the reference
//! fixtures' `logits.npy` are.
//!
//! The layout: the magic `\x93NUMPY`, version bytes `1 0`, a little-endian u16 header length, then an ASCII Python dict
//! literal `{'descr': '<f4', 'fortran_order': False, 'shape': (..), }` padded with spaces and ending in `\n` so that the
//! data starts at a multiple of 64 bytes; then the elements in C order, little-endian.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// NumPy aligns the start of the data to this many bytes.
const ALIGN: usize = 64;

/// Why an `.npy` file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    /// An I/O error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an `.npy` this reader handles.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data does not match the shape.
    #[error("{}: shape {shape:?} holds {expected} elements, but {found} were given", path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// The shape.
        shape: Vec<usize>,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        found: usize,
    },
}

/// The version 1.0 header (magic through the closing newline) of a little-endian float32 C-order array of `shape`.
pub fn header_f32(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => "()".to_owned(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // magic + version + u16 length + dict + padding + '\n' must be a multiple of ALIGN.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    dict.push_str(&" ".repeat((ALIGN - unpadded % ALIGN) % ALIGN));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    // Shapes of any realistic rank keep the dict far below u16::MAX.
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes `data` as a float32 array of `shape` (C order) to `path`.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    // Written as `FILE.part` and renamed when complete, so a failed write (a full disk) leaves no half array; the
    // `.part` is removed on error and by the binary's signal handler.
    let path = path.as_ref();
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = crate::checkpoint::packed::PartialFile::new(PathBuf::from(part));
    let mut writer = NpyWriter::create(&part.path, shape)?;
    writer.write(data)?;
    writer.finish()?;
    part.commit(path).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Streams a float32 array to an `.npy` file piece by piece (e.g. one decoding step's logits at a time).
#[derive(Debug)]
pub struct NpyWriter {
    path: PathBuf,
    out: BufWriter<File>,
    shape: Vec<usize>,
    expected: usize,
    written: usize,
}

impl NpyWriter {
    /// Creates `path` and writes the header for an array of `shape`.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<NpyWriter, NpyError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| NpyError::Io {
            path: path.clone(),
            source,
        };
        let mut out = BufWriter::new(File::create(&path).map_err(io)?);
        out.write_all(&header_f32(shape)).map_err(io)?;
        Ok(NpyWriter {
            expected: shape.iter().product(),
            shape: shape.to_vec(),
            written: 0,
            out,
            path,
        })
    }

    /// Appends the next elements in C order; more elements than the shape holds is an error.
    pub fn write(&mut self, data: &[f32]) -> Result<(), NpyError> {
        if self.written + data.len() > self.expected {
            return Err(NpyError::Length {
                path: self.path.clone(),
                shape: self.shape.clone(),
                expected: self.expected,
                found: self.written + data.len(),
            });
        }
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        crate::fault::check_write(crate::fault::WriteKind::Logits)
            .and_then(|()| self.out.write_all(&bytes))
            .map_err(|source| NpyError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.written += data.len();
        Ok(())
    }

    /// Flushes the file; fewer elements than the shape holds is an error.
    pub fn finish(mut self) -> Result<(), NpyError> {
        if self.written != self.expected {
            return Err(NpyError::Length {
                path: self.path,
                shape: self.shape,
                expected: self.expected,
                found: self.written,
            });
        }
        self.out.flush().map_err(|source| NpyError::Io {
            path: self.path,
            source,
        })
    }
}

/// A float32 array read from an `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyF32 {
    /// The shape (C order).
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<f32>,
}

/// Reads a little-endian float32, C-order `.npy` file (versions 1.0 to 3.0, as NumPy writes them).
pub fn read_f32(path: impl AsRef<Path>) -> Result<NpyF32, NpyError> {
    let path = path.as_ref();
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    BufReader::new(File::open(path).map_err(io)?)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse_f32(&bytes).map_err(|reason| NpyError::Format {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses the bytes of a float32 `.npy` file.
pub fn parse_f32(bytes: &[u8]) -> Result<NpyF32, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not an .npy file (no \\x93NUMPY magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}.{}", bytes[7])),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("file is truncated inside its header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr")?;
    if !matches!(descr.trim_matches(['\'', '"']), "<f4" | "float32") {
        return Err(format!(
            "dtype is {descr}; expected little-endian float32 ('<f4')"
        ));
    }
    if dict_value(header, "fortran_order")? != "False" {
        return Err("fortran_order is True; only C-order arrays are read".into());
    }
    let shape_text = dict_value(header, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("shape {shape_text} is not a tuple"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("shape {shape_text} is not a tuple of integers"))?;
    let data = &bytes[start + header_len..];
    // Checked: the header is untrusted, and its shape must not size anything before it matches the data.
    let needed = shape.iter().try_fold(4usize, |n, &d| n.checked_mul(d));
    if needed != Some(data.len()) {
        let needs = needed.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string());
        return Err(format!(
            "shape {shape:?} needs {needs} data bytes, the file has {}",
            data.len()
        ));
    }
    let data = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(NpyF32 { shape, data })
}

/// The source text of `key`'s value in the header dict (up to the next top-level comma or the closing brace).
fn dict_value<'h>(header: &'h str, key: &str) -> Result<&'h str, String> {
    let missing = || format!("header has no '{key}' entry");
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))
        .ok_or_else(missing)?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(missing)?
        .trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Ok(rest[..i].trim()),
            _ => {}
        }
    }
    Err(missing())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_the_spec_byte_for_byte() {
        // Hand-built from the NPY 1.0 spec: magic, version, u16 length, dict text, spaces, '\n'; the dict
        // (59 bytes) does not fit in 64 bytes with the 10-byte prefix and the newline, so the header takes 128.
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(dict.len(), 59);
        let pad = 128 - 10 - dict.len() - 1;
        let mut expected = b"\x93NUMPY\x01\x00".to_vec();
        expected.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
        expected.extend_from_slice(dict.as_bytes());
        expected.extend(std::iter::repeat_n(b' ', pad));
        expected.push(b'\n');
        assert_eq!(header_f32(&[2, 3]), expected);
        assert_eq!(expected.len(), 128);
        assert_eq!(&header_f32(&[2, 3])[8..10], &[118, 0]);
        // Even a 1-D shape's 57-byte dict needs the second 64-byte block.
        assert_eq!(header_f32(&[5]).len(), 128);
    }

    #[test]
    fn tuple_syntax_and_alignment_for_every_rank() {
        for (shape, text) in [
            (vec![], "'shape': (), }"),
            (vec![5], "'shape': (5,), }"),
            (vec![4, 2, 50272], "'shape': (4, 2, 50272), }"),
            (
                vec![1; 12],
                "'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), }",
            ),
        ] {
            let h = header_f32(&shape);
            assert_eq!(h.len() % 64, 0, "{shape:?}");
            assert_eq!(*h.last().unwrap(), b'\n');
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + len, h.len());
            assert!(String::from_utf8_lossy(&h).contains(text), "{shape:?}");
        }
    }

    #[test]
    fn round_trip_and_length_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 128 + 24 * 4);
        assert_eq!(&bytes[128..132], &(-3.0f32).to_le_bytes());
        let back = read_f32(&path).unwrap();
        assert_eq!(back.shape, vec![2, 3, 4]);
        assert_eq!(back.data, data);

        let err = write_f32(&path, &[2, 3], &data).unwrap_err().to_string();
        assert!(err.contains("holds 6 elements, but 24 were given"), "{err}");
        let mut w = NpyWriter::create(&path, &[2, 3]).unwrap();
        w.write(&data[..4]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("holds 6 elements, but 4 were given"), "{err}");
    }

    #[test]
    fn reader_accepts_numpy_padding_and_rejects_what_it_cannot_read() {
        // NumPy >= 1.24 pads extra spaces after the dict; the reader must not care.
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        let mut file = b"\x93NUMPY\x01\x00".to_vec();
        let body = format!("{dict}{}\n", " ".repeat(128 - 10 - dict.len() - 1));
        file.extend_from_slice(&(body.len() as u16).to_le_bytes());
        file.extend_from_slice(body.as_bytes());
        for v in [1.0f32, -2.0, 0.25] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(parse_f32(&file).unwrap().data, vec![1.0, -2.0, 0.25]);

        let replace = |from: &[u8], to: &[u8]| {
            let at = file.windows(from.len()).position(|w| w == from).unwrap();
            let mut out = file.clone();
            out[at..at + to.len()].copy_from_slice(to);
            out
        };
        let f8 = replace(b"<f4", b"<f8");
        assert!(parse_f32(&f8).unwrap_err().contains("'<f8'"));
        let fortran = replace(b"False", b"True ");
        assert!(parse_f32(&fortran).unwrap_err().contains("fortran_order"));
        assert!(parse_f32(&file[..file.len() - 1])
            .unwrap_err()
            .contains("needs 12 data bytes, the file has 11"));
        assert!(parse_f32(b"hello world").is_err());
    }
}
