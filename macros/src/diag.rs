//! Error collection: every problem of every spec is gathered (like serde's `Ctxt`) and reported in one build.

use std::fmt;
use std::ops::Range;

/// One spec file as read from disk: the path shown in messages and the text.
#[derive(Clone, Debug)]
pub struct SpecFile {
    /// The path as the user wrote it, joined with the file name (`model_specs/opt-30b.toml`).
    pub shown: String,
    /// The file's contents.
    pub text: String,
}

impl SpecFile {
    /// A file from its shown path and text (tests build these from strings).
    pub fn new(shown: impl Into<String>, text: impl Into<String>) -> Self {
        SpecFile {
            shown: shown.into(),
            text: text.into(),
        }
    }

    /// The file name without `.toml`, which must equal the spec's `name`.
    pub fn stem(&self) -> &str {
        let file = self.shown.rsplit('/').next().unwrap_or(&self.shown);
        file.strip_suffix(".toml").unwrap_or(file)
    }

    /// 1-based line and column (in characters, as rustc counts them) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // Spans from the TOML parser are on char boundaries; step back defensively if not.
        let mut start = offset;
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

/// One error in one spec, with the place it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Shown path of the file (or of the directory, for errors not tied to a file).
    pub path: String,
    /// 1-based line and column, when the error has a place in a file.
    pub at: Option<(usize, usize)>,
    /// The field concerned, when there is one.
    pub field: Option<String>,
    /// What is wrong and, where possible, what to write instead.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some((line, col)) = self.at {
            write!(f, ":{line}:{col}")?;
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "`{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Collects diagnostics; nothing is reported until the whole directory has been checked.
#[derive(Debug, Default)]
pub struct Ctxt {
    errors: Vec<(usize, Diagnostic)>,
}

impl Ctxt {
    /// An empty collector.
    pub fn new() -> Self {
        Ctxt::default()
    }

    /// Records an error at `span` of `file` about `field` (if any).
    pub fn error_at(
        &mut self,
        file: &SpecFile,
        span: Range<usize>,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.errors.push((
            span.start,
            Diagnostic {
                path: file.shown.clone(),
                at: Some(file.line_col(span.start)),
                field: field.map(str::to_owned),
                message: message.into(),
            },
        ));
    }

    /// Records an error that concerns a path as a whole (an unreadable directory or file).
    pub fn error_path(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push((
            0,
            Diagnostic {
                path: path.to_owned(),
                at: None,
                field: None,
                message: message.into(),
            },
        ));
    }

    /// How many errors have been recorded so far (to tell whether one file added any).
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether no error was recorded.
    #[cfg_attr(not(test), allow(dead_code))] // only the tests ask
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors, ordered by file and position so a reader fixes them top to bottom.
    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        let mut errors = self.errors;
        // Stable sort: files keep their (sorted) order, errors within a file go by position.
        errors.sort_by(|(a_off, a), (b_off, b)| a.path.cmp(&b.path).then(a_off.cmp(b_off)));
        errors.into_iter().map(|(_, d)| d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let file = SpecFile::new("d/x.toml", "a = 1\n# é\nb = 2\n");
        assert_eq!(file.line_col(0), (1, 1));
        assert_eq!(file.line_col(4), (1, 5));
        let b = file.text.find('b').unwrap();
        assert_eq!(file.line_col(b), (3, 1));
        // The byte after "é" is column 4 (three characters before it), not 5.
        let after = file.text.find('é').unwrap() + 'é'.len_utf8();
        assert_eq!(file.line_col(after), (2, 4));
        assert_eq!(file.stem(), "x");
    }

    #[test]
    fn diagnostics_are_sorted_by_file_then_position() {
        let a = SpecFile::new("d/a.toml", "x = 1\ny = 2\n");
        let b = SpecFile::new("d/b.toml", "x = 1\n");
        let mut cx = Ctxt::new();
        cx.error_at(&b, 0..1, Some("x"), "late file");
        cx.error_at(&a, 6..7, Some("y"), "second line");
        cx.error_at(&a, 0..1, None, "first line");
        let shown: Vec<String> = cx
            .into_diagnostics()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "d/a.toml:1:1: first line",
                "d/a.toml:2:1: `y`: second line",
                "d/b.toml:1:1: `x`: late file"
            ]
        );
    }
}
