//! Parsing: one TOML spec file into a [`RawSpec`], every field with the byte span it came from.
//!
//! Parsing never stops at the first problem: a missing field, an unknown field, a value of the wrong type or an
//! unknown activation / dtype are each recorded in the [`Ctxt`] and parsing goes on, so one build reports them all.
//! Cross-field rules (`n_head` divides `hidden_size`, ...) are [`crate::validate`]'s job.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{Ctxt, SpecFile};

/// A value and where it was written (`None` for a default taken because the field was absent).
#[derive(Clone, Debug, PartialEq)]
pub struct Field<T> {
    /// The parsed value.
    pub value: T,
    /// Byte range of the value in the file.
    pub span: Option<Range<usize>>,
}

/// The feed-forward activation named in a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `gelu` (exact, erf-based).
    Gelu,
}

/// The weight dtype named in a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `float16`.
    F16,
    /// `bfloat16`.
    BF16,
    /// `float32`.
    F32,
}

impl DType {
    /// Accepts the spellings strata's runtime accepts (`DType::parse`), case-insensitively.
    fn parse(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            _ => None,
        }
    }
}

/// One spec as written; a field is `None` when it was missing or invalid (an error was already recorded).
#[derive(Clone, Debug, Default)]
pub struct RawSpec {
    /// Span of the whole document (where "missing field" errors point).
    pub document: Range<usize>,
    /// `name`: the model's canonical name, equal to the file name without `.toml`.
    pub name: Option<Field<String>>,
    /// `aliases`: other names `get_opt_config` accepts (optional, default none).
    pub aliases: Option<Field<Vec<Field<String>>>>,
    /// Integer fields, in [`INTEGER_FIELDS`] order.
    pub integers: [Option<Field<u64>>; INTEGER_FIELDS.len()],
    /// Token id fields, in [`TOKEN_FIELDS`] order.
    pub tokens: [Option<Field<u32>>; TOKEN_FIELDS.len()],
    /// `activation`.
    pub activation: Option<Field<Activation>>,
    /// `layer_norm_eps`.
    pub layer_norm_eps: Option<Field<f64>>,
    /// Boolean fields, in [`BOOL_FIELDS`] order (the optional ones filled with their defaults).
    pub bools: [Option<Field<bool>>; BOOL_FIELDS.len()],
    /// `dtype`.
    pub dtype: Option<Field<DType>>,
}

/// Size fields, all required, all at least 1.
pub const INTEGER_FIELDS: [&str; 7] = [
    "num_hidden_layers",
    "hidden_size",
    "n_head",
    "ffn_embed_dim",
    "word_embed_proj_dim",
    "vocab_size",
    "max_seq_len",
];
/// Token ids, all required.
pub const TOKEN_FIELDS: [&str; 3] = ["pad_token_id", "bos_token_id", "eos_token_id"];
/// Boolean fields and their defaults (`None`: required).
pub const BOOL_FIELDS: [(&str, Option<bool>); 5] = [
    ("do_layer_norm_before", None),
    ("enable_bias", None),
    ("layer_norm_elementwise_affine", None),
    ("remove_final_layer_norm", Some(false)),
    ("tie_word_embeddings", Some(true)),
];
const OTHER_FIELDS: [&str; 5] = ["name", "aliases", "activation", "layer_norm_eps", "dtype"];

/// Every field a spec may contain, for "unknown field" messages.
pub fn known_fields() -> Vec<&'static str> {
    let mut all: Vec<&str> = OTHER_FIELDS[..2].to_vec();
    all.extend(INTEGER_FIELDS);
    all.extend(TOKEN_FIELDS);
    all.extend(&OTHER_FIELDS[2..]);
    all.extend(BOOL_FIELDS.iter().map(|(name, _)| *name));
    all
}

impl RawSpec {
    /// The integer field `name` (one of [`INTEGER_FIELDS`]).
    pub fn integer(&self, name: &str) -> Option<&Field<u64>> {
        let i = INTEGER_FIELDS.iter().position(|f| *f == name)?;
        self.integers[i].as_ref()
    }

    /// The token id field `name` (one of [`TOKEN_FIELDS`]).
    pub fn token(&self, name: &str) -> Option<&Field<u32>> {
        let i = TOKEN_FIELDS.iter().position(|f| *f == name)?;
        self.tokens[i].as_ref()
    }

    /// The boolean field `name` (one of [`BOOL_FIELDS`]).
    pub fn boolean(&self, name: &str) -> Option<&Field<bool>> {
        let i = BOOL_FIELDS.iter().position(|(f, _)| *f == name)?;
        self.bools[i].as_ref()
    }
}

type Value<'a> = Spanned<DeValue<'a>>;

/// Parses one file, recording every syntax and field error in `cx`.
pub fn parse(file: &SpecFile, cx: &mut Ctxt) -> RawSpec {
    let (doc, syntax_errors) = DeTable::parse_recoverable(&file.text);
    for err in &syntax_errors {
        let span = err.span().unwrap_or(0..0);
        cx.error_at(file, span, None, format!("invalid TOML: {}", err.message()));
    }
    let document = doc.span();
    let table = doc.into_inner();
    let mut spec = RawSpec {
        document: document.clone(),
        ..RawSpec::default()
    };
    let mut p = Parser {
        file,
        cx,
        table: &table,
        document,
    };

    spec.name = p.required(
        "name",
        "a string, e.g. `name = \"opt-125m\"`",
        Parser::string,
    );
    spec.aliases = p.optional("aliases", Parser::string_array).or(Some(Field {
        value: Vec::new(),
        span: None,
    }));
    for (slot, name) in spec.integers.iter_mut().zip(INTEGER_FIELDS) {
        *slot = p.required(name, "a positive integer", Parser::size);
    }
    for (slot, name) in spec.tokens.iter_mut().zip(TOKEN_FIELDS) {
        *slot = p.required(
            name,
            "a token id (a non-negative integer)",
            Parser::token_id,
        );
    }
    spec.activation = p.required("activation", "`\"relu\"` or `\"gelu\"`", Parser::activation);
    spec.layer_norm_eps = p.required(
        "layer_norm_eps",
        "a float, e.g. `layer_norm_eps = 1e-5`",
        Parser::float,
    );
    for (slot, (name, default)) in spec.bools.iter_mut().zip(BOOL_FIELDS) {
        *slot = match default {
            None => p.required(name, "`true` or `false`", Parser::boolean),
            Some(value) => p
                .optional(name, Parser::boolean)
                .or(Some(Field { value, span: None })),
        };
    }
    spec.dtype = p.required(
        "dtype",
        "`\"float16\"`, `\"bfloat16\"` or `\"float32\"`",
        Parser::dtype,
    );

    let known = known_fields();
    for (key, _) in table.iter() {
        if !known.contains(&key.get_ref().as_ref()) {
            let hint = match closest(key.get_ref(), &known) {
                Some(near) => format!("; did you mean `{near}`?"),
                None => String::new(),
            };
            p.cx.error_at(
                file,
                key.span(),
                Some(key.get_ref()),
                format!("unknown field{hint} (spec fields: {})", known.join(", ")),
            );
        }
    }
    spec
}

/// Walks the top-level table; each getter returns `None` after recording why the value is unusable.
struct Parser<'a, 'c> {
    file: &'a SpecFile,
    cx: &'c mut Ctxt,
    table: &'a DeTable<'a>,
    document: Range<usize>,
}

impl<'a> Parser<'a, '_> {
    fn required<T>(
        &mut self,
        name: &str,
        expected: &str,
        get: fn(&mut Self, &str, &Value<'a>) -> Option<T>,
    ) -> Option<Field<T>> {
        if self.table.get(name).is_none() {
            let at = self.document.start..self.document.start;
            self.cx.error_at(
                self.file,
                at,
                Some(name),
                format!("missing field (expected {expected})"),
            );
            return None;
        }
        self.optional(name, get)
    }

    fn optional<T>(
        &mut self,
        name: &str,
        get: fn(&mut Self, &str, &Value<'a>) -> Option<T>,
    ) -> Option<Field<T>> {
        let value = self.table.get(name)?;
        get(self, name, value).map(|v| Field {
            value: v,
            span: Some(value.span()),
        })
    }

    fn wrong_type(&mut self, name: &str, value: &Value<'_>, expected: &str) {
        self.cx.error_at(
            self.file,
            value.span(),
            Some(name),
            format!("expected {expected}, found {}", describe(value.get_ref())),
        );
    }

    fn integer(&mut self, name: &str, value: &Value<'a>, expected: &str) -> Option<i128> {
        match value.get_ref() {
            DeValue::Integer(int) => match i128::from_str_radix(int.as_str(), int.radix()) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.wrong_type(name, value, expected);
                    None
                }
            },
            _ => {
                self.wrong_type(name, value, expected);
                None
            }
        }
    }

    fn size(&mut self, name: &str, value: &Value<'a>) -> Option<u64> {
        // Sizes become `usize` literals; u32::MAX keeps them valid on 32-bit targets too.
        let v = self.integer(name, value, "a positive integer")?;
        match u32::try_from(v) {
            Ok(v) => Some(u64::from(v)),
            Err(_) => {
                let reason = if v < 0 {
                    format!("{name} = {v} is negative; it must be a positive integer")
                } else {
                    format!("{name} = {v} is too large (at most {})", u32::MAX)
                };
                self.cx
                    .error_at(self.file, value.span(), Some(name), reason);
                None
            }
        }
    }

    fn token_id(&mut self, name: &str, value: &Value<'a>) -> Option<u32> {
        let v = self.integer(name, value, "a token id (a non-negative integer)")?;
        match u32::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                let reason = format!("{name} = {v} is not a token id (0 to {})", u32::MAX);
                self.cx
                    .error_at(self.file, value.span(), Some(name), reason);
                None
            }
        }
    }

    fn float(&mut self, name: &str, value: &Value<'a>) -> Option<f64> {
        match value.get_ref() {
            DeValue::Float(f) => match f.as_str().parse::<f64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    self.wrong_type(name, value, "a float");
                    None
                }
            },
            _ => {
                self.wrong_type(name, value, "a float (write `1.0`, not `1`)");
                None
            }
        }
    }

    fn boolean(&mut self, name: &str, value: &Value<'a>) -> Option<bool> {
        match value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(name, value, "`true` or `false`");
                None
            }
        }
    }

    fn string(&mut self, name: &str, value: &Value<'a>) -> Option<String> {
        match value.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.wrong_type(name, value, "a string");
                None
            }
        }
    }

    fn string_array(&mut self, name: &str, value: &Value<'a>) -> Option<Vec<Field<String>>> {
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                name,
                value,
                "an array of strings, e.g. `aliases = [\"opt-1-3b\"]`",
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items.iter() {
            match self.string(name, item) {
                Some(s) => out.push(Field {
                    value: s,
                    span: Some(item.span()),
                }),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn activation(&mut self, name: &str, value: &Value<'a>) -> Option<Activation> {
        let s = self.string(name, value)?;
        match s.as_str() {
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::Gelu),
            other => {
                let reason = format!("unknown activation \"{other}\" (OPT models use \"relu\"; Galactica uses \"gelu\")");
                self.cx
                    .error_at(self.file, value.span(), Some(name), reason);
                None
            }
        }
    }

    fn dtype(&mut self, name: &str, value: &Value<'a>) -> Option<DType> {
        let s = self.string(name, value)?;
        let dtype = DType::parse(&s);
        if dtype.is_none() {
            let reason = format!(
                "unknown dtype \"{s}\" (expected \"float16\", \"bfloat16\" or \"float32\")"
            );
            self.cx
                .error_at(self.file, value.span(), Some(name), reason);
        }
        dtype
    }
}

/// How a value reads in an error ("an integer `12`").
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("a string \"{s}\""),
        DeValue::Integer(i) => format!("an integer `{i}`"),
        DeValue::Float(f) => format!("a float `{f}`"),
        DeValue::Boolean(b) => format!("a boolean `{b}`"),
        DeValue::Datetime(d) => format!("a datetime `{d}`"),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// The known field nearest to a misspelt one, if it is near enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const OPT_125M: &str = r#"name = "opt-125m"
aliases = ["facebook-opt-125m"]
num_hidden_layers = 12
hidden_size = 768
n_head = 12
ffn_embed_dim = 3_072
word_embed_proj_dim = 768
vocab_size = 50272
max_seq_len = 2048
pad_token_id = 1
bos_token_id = 2
eos_token_id = 2
activation = "relu"
layer_norm_eps = 1e-5
do_layer_norm_before = true
enable_bias = true
layer_norm_elementwise_affine = true
dtype = "float16"
"#;

    fn errors(text: &str) -> Vec<String> {
        let file = SpecFile::new("specs/opt-125m.toml", text);
        let mut cx = Ctxt::new();
        parse(&file, &mut cx);
        cx.into_diagnostics()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn parses_every_field_with_defaults() {
        let file = SpecFile::new("specs/opt-125m.toml", OPT_125M);
        let mut cx = Ctxt::new();
        let spec = parse(&file, &mut cx);
        assert!(cx.is_empty(), "{:?}", cx.into_diagnostics());
        assert_eq!(spec.name.as_ref().unwrap().value, "opt-125m");
        assert_eq!(spec.integer("ffn_embed_dim").unwrap().value, 3072);
        assert_eq!(spec.token("eos_token_id").unwrap().value, 2);
        assert_eq!(spec.activation.as_ref().unwrap().value, Activation::Relu);
        assert_eq!(spec.layer_norm_eps.as_ref().unwrap().value, 1e-5);
        assert_eq!(spec.dtype.as_ref().unwrap().value, DType::F16);
        let tie = spec.boolean("tie_word_embeddings").unwrap();
        assert!(tie.value && tie.span.is_none(), "default true, not written");
        assert!(!spec.boolean("remove_final_layer_norm").unwrap().value);
        // The span points at the value: line 6 is `ffn_embed_dim = 3_072`.
        let span = spec.integers[3].as_ref().unwrap().span.clone().unwrap();
        assert_eq!(file.line_col(span.start), (6, 17));
    }

    #[test]
    fn missing_field_points_at_the_start_of_the_file() {
        let text = OPT_125M.replace("vocab_size = 50272\n", "");
        assert_eq!(
            errors(&text),
            ["specs/opt-125m.toml:1:1: `vocab_size`: missing field (expected a positive integer)"]
        );
    }

    #[test]
    fn unknown_field_suggests_the_nearest() {
        let text = OPT_125M.replace("n_head = 12", "n_head = 12\nn_heads = 12");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with(
                "specs/opt-125m.toml:6:1: `n_heads`: unknown field; did you mean `n_head`?"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn wrong_types_and_unknown_names_are_all_reported() {
        let text = OPT_125M
            .replace("hidden_size = 768", "hidden_size = \"768\"")
            .replace("\"relu\"", "\"swish\"")
            .replace("\"float16\"", "\"int8\"")
            .replace("layer_norm_eps = 1e-5", "layer_norm_eps = 1")
            .replace("pad_token_id = 1", "pad_token_id = -1");
        assert_eq!(
            errors(&text),
            [
                "specs/opt-125m.toml:4:15: `hidden_size`: expected a positive integer, found a string \"768\"",
                "specs/opt-125m.toml:10:16: `pad_token_id`: pad_token_id = -1 is not a token id (0 to 4294967295)",
                "specs/opt-125m.toml:13:14: `activation`: unknown activation \"swish\" (OPT models use \"relu\"; Galactica uses \"gelu\")",
                "specs/opt-125m.toml:14:18: `layer_norm_eps`: expected a float (write `1.0`, not `1`), found an integer `1`",
                "specs/opt-125m.toml:18:9: `dtype`: unknown dtype \"int8\" (expected \"float16\", \"bfloat16\" or \"float32\")",
            ]
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let text = OPT_125M.replace("n_head = 12", "n_head = = 12");
        let errs = errors(&text);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("specs/opt-125m.toml:5:") && e.contains("invalid TOML")),
            "{errs:?}"
        );
    }

    #[test]
    fn negative_and_huge_sizes_are_rejected() {
        let text = OPT_125M
            .replace("num_hidden_layers = 12", "num_hidden_layers = -3")
            .replace("vocab_size = 50272", "vocab_size = 0x1_0000_0000");
        assert_eq!(
            errors(&text),
            [
                "specs/opt-125m.toml:3:21: `num_hidden_layers`: num_hidden_layers = -3 is negative; it must be a positive integer",
                "specs/opt-125m.toml:8:14: `vocab_size`: vocab_size = 4294967296 is too large (at most 4294967295)",
            ]
        );
    }
}
