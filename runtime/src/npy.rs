//! float32 `.npy` files (NumPy's format): what `strata generate --dump-logits` writes and the reference fixtures'
//! `logits.npy` are. The header (magic, version, the Python dict literal, alignment) is read and written by the
//! `npyz` crate; this module checks the dtype, order and length and moves the little-endian float32 elements.

use std::fs::File;
use std::io::{BufReader, BufWriter, Cursor, Read, Write};
use std::path::{Path, PathBuf};

use npyz::WriterBuilder;

/// The one element type this module reads and writes: little-endian float32.
const F4: &str = "<f4";

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

/// The header (magic through the closing newline, data aligned to 64 bytes) of a little-endian float32 C-order
/// array of `shape`.
pub fn header_f32(shape: &[usize]) -> std::io::Result<Vec<u8>> {
    let dtype = npyz::DType::Plain(F4.parse().map_err(std::io::Error::other)?);
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut out = Vec::new();
    npyz::WriteOptions::<f32>::new()
        .dtype(dtype)
        .shape(&shape)
        .writer(&mut out)
        .write_header_only()?;
    Ok(out)
}

/// Writes `data` as a float32 array of `shape` (C order) to `path`.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    // Written as `FILE.part` and renamed when complete, so a failed write (a full disk) leaves no half array; the
    // `.part` is removed on error and by the binary's signal handler.
    let path = path.as_ref();
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = crate::checkpoint::packed::PartialFile::new(PathBuf::from(part));
    let mut writer = NpyWriter::create(part.path(), shape)?;
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
        let header = header_f32(shape).map_err(io)?;
        out.write_all(&header).map_err(io)?;
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

/// Checks that the header length a `.npy` prefix states fits in `bytes`. npyz allocates the stated length before
/// reading the header, so a garbage length (up to 4 GiB in versions 2 and 3) would abort the process on a failed
/// allocation instead of being an error; this guard is the only format logic kept here for that reason.
fn header_fits(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Ok(()); // npyz names what is wrong
    }
    let (len, prefix) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        2 | 3 => return Err("file is truncated inside its header".into()),
        _ => return Ok(()),
    };
    if prefix + len > bytes.len() {
        return Err(format!(
            "file is truncated inside its header: the header claims {len} bytes, {} follow",
            bytes.len() - prefix
        ));
    }
    Ok(())
}

/// Parses the bytes of a float32 `.npy` file.
pub fn parse_f32(bytes: &[u8]) -> Result<NpyF32, String> {
    header_fits(bytes)?;
    let mut reader = Cursor::new(bytes);
    let header = npyz::NpyHeader::from_reader(&mut reader)
        .map_err(|e| format!("not a float32 .npy file: {e}"))?;
    let data = bytes
        .get(reader.position() as usize..)
        .ok_or("file is truncated inside its header")?;
    match header.dtype() {
        npyz::DType::Plain(t) if t.to_string() == F4 => {}
        other => {
            return Err(format!(
                "dtype is {}; expected little-endian float32 ('{F4}')",
                other.descr()
            ))
        }
    }
    if header.order() != npyz::Order::C {
        return Err("fortran_order is True; only C-order arrays are read".into());
    }
    let shape = header
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("shape {:?} does not fit this machine", header.shape()))?;
    // Checked: the header is untrusted, and its shape must not size anything before it matches the data.
    let needed = shape.iter().try_fold(4usize, |n, &d| n.checked_mul(d));
    if needed != Some(data.len()) {
        let needs = needed.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string());
        return Err(format!(
            "shape {shape:?} needs {needs} data bytes, the file has {}",
            data.len()
        ));
    }
    let data = npyz::NpyFile::with_header(header, data)
        .into_vec::<f32>()
        .map_err(|e| format!("cannot read the elements: {e}"))?;
    Ok(NpyF32 { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_aligned_and_read_back_for_every_rank() {
        for shape in [vec![], vec![5], vec![2, 3], vec![4, 2, 50272], vec![1; 12]] {
            let h = header_f32(&shape).unwrap();
            // NumPy's rule: the data starts at a multiple of 64 bytes, after a '\n'-terminated dict.
            assert_eq!(h.len() % 64, 0, "{shape:?}");
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(*h.last().unwrap(), b'\n');
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(10 + len, h.len());
            let text = String::from_utf8_lossy(&h);
            assert!(text.contains("'descr': '<f4'") && text.contains("'fortran_order': False"));
            let n: usize = shape.iter().product();
            let mut file = h.clone();
            file.extend((0..n).flat_map(|i| (i as f32).to_le_bytes()));
            let back = parse_f32(&file).unwrap();
            assert_eq!(back.shape, shape);
            assert_eq!(back.data.len(), n);
            assert!(back.data.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }

    #[test]
    fn round_trip_and_length_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let start = header_f32(&[2, 3, 4]).unwrap().len();
        assert_eq!(bytes.len(), start + 24 * 4);
        assert_eq!(&bytes[start..start + 4], &(-3.0f32).to_le_bytes());
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
        // A header length beyond the file (a version 2 header claiming 3.5 GB) is an error, not an allocation.
        let mut huge = b"\x93NUMPY\x02\x00".to_vec();
        huge.extend_from_slice(&3_581_608_054u32.to_le_bytes());
        huge.extend_from_slice(b"{'descr': '<f4'");
        let err = parse_f32(&huge).unwrap_err();
        assert!(err.contains("claims 3581608054 bytes, 15 follow"), "{err}");
        assert!(parse_f32(&file[..20]).unwrap_err().contains("truncated"));
        assert!(parse_f32(b"\x93NUMPY\x03\x00\x01\x00\x00")
            .unwrap_err()
            .contains("truncated"));
    }
}
