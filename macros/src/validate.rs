//! Validation: the rules a parsed spec must satisfy to describe a runnable model, checked with the span of the value
//! at fault, and the conversion into a complete [`ModelDef`] that [`crate::expand`] generates code from.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::diag::{Ctxt, SpecFile};
use crate::spec::{Activation, DType, Field, RawSpec, INTEGER_FIELDS, TOKEN_FIELDS};

/// A spec that passed every check: plain values, ready for code generation.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDef {
    /// Canonical name (`opt-1.3b`).
    pub name: String,
    /// Where the name is written in its file (directory-level errors point there).
    pub name_span: Range<usize>,
    /// Other accepted names, lower case.
    pub aliases: Vec<String>,
    /// The Rust type generated for it (`Opt1_3b`).
    pub type_name: String,
    /// The Cargo feature that selects it (`opt-1-3b`).
    pub feature: String,
    /// Decoder layers.
    pub num_hidden_layers: u64,
    /// Residual width.
    pub hidden_size: u64,
    /// Attention heads.
    pub n_head: u64,
    /// fc1 output width.
    pub ffn_embed_dim: u64,
    /// Token embedding width.
    pub word_embed_proj_dim: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Longest sequence.
    pub max_seq_len: u64,
    /// Padding token id.
    pub pad_token_id: u32,
    /// BOS token id.
    pub bos_token_id: u32,
    /// EOS token id.
    pub eos_token_id: u32,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Layer norm epsilon, as the f32 the runtime uses.
    pub layer_norm_eps: f32,
    /// Pre-LN (true) or post-LN.
    pub do_layer_norm_before: bool,
    /// Biases in linear layers.
    pub enable_bias: bool,
    /// Weight and bias in layer norms.
    pub layer_norm_elementwise_affine: bool,
    /// Hugging Face's `_remove_final_layer_norm`.
    pub remove_final_layer_norm: bool,
    /// LM head tied to the token embedding.
    pub tie_word_embeddings: bool,
    /// Weight dtype.
    pub dtype: DType,
}

impl ModelDef {
    /// Width of one head.
    pub fn head_dim(&self) -> u64 {
        self.hidden_size / self.n_head
    }

    /// Whether project_in / project_out exist.
    pub fn has_projection(&self) -> bool {
        self.word_embed_proj_dim != self.hidden_size
    }

    /// Whether the decoder ends with a layer norm.
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
}

/// Checks one parsed spec; returns the model only if this file produced no error at all (parse errors included).
pub fn validate(
    file: &SpecFile,
    spec: &RawSpec,
    cx: &mut Ctxt,
    errors_before: usize,
) -> Option<ModelDef> {
    let mut v = Validator { file, cx };

    if let Some(name) = &spec.name {
        v.name(&name.value, span_of(name, spec));
    }
    if let Some(aliases) = &spec.aliases {
        for alias in &aliases.value {
            v.alias(
                &alias.value,
                spec.name.as_ref().map(|n| n.value.as_str()),
                span_of(alias, spec),
            );
        }
    }
    for field in INTEGER_FIELDS {
        if let Some(f) = spec.integer(field) {
            if f.value == 0 {
                let reason = if field == "num_hidden_layers" {
                    "num_hidden_layers = 0: a model needs at least one decoder layer".to_owned()
                } else {
                    format!("{field} = 0: must be at least 1")
                };
                v.error(span_of(f, spec), field, reason);
            }
        }
    }
    if let (Some(h), Some(n)) = (spec.integer("hidden_size"), spec.integer("n_head")) {
        if n.value != 0 && h.value % n.value != 0 {
            let reason = format!(
                "n_head = {} does not divide hidden_size = {} (each head gets hidden_size / n_head channels)",
                n.value, h.value
            );
            v.error(span_of(n, spec), "n_head", reason);
        }
    }
    if let Some(vocab) = spec.integer("vocab_size") {
        for field in TOKEN_FIELDS {
            if let Some(id) = spec.token(field) {
                if u64::from(id.value) >= vocab.value && vocab.value != 0 {
                    let reason = format!(
                        "{field} = {} is outside the vocabulary of {}",
                        id.value, vocab.value
                    );
                    v.error(span_of(id, spec), field, reason);
                }
            }
        }
    }
    if let Some(eps) = &spec.layer_norm_eps {
        let as_f32 = eps.value as f32;
        if !(eps.value > 0.0 && as_f32 > 0.0 && as_f32.is_finite()) {
            let reason = format!(
                "layer_norm_eps = {} must be a positive number representable as f32 (OPT uses 1e-5)",
                eps.value
            );
            v.error(span_of(eps, spec), "layer_norm_eps", reason);
        }
    }
    if let (Some(h), Some(f), Some(l), Some(p), Some(vocab), Some(s)) = (
        spec.integer("hidden_size"),
        spec.integer("ffn_embed_dim"),
        spec.integer("num_hidden_layers"),
        spec.integer("word_embed_proj_dim"),
        spec.integer("vocab_size"),
        spec.integer("max_seq_len"),
    ) {
        // The runtime's const fns count parameters and bytes in u64; reject what would overflow them (f32 bytes).
        let (h, f, l, p, vocab, s) = (
            u128::from(h.value),
            u128::from(f.value),
            u128::from(l.value),
            u128::from(p.value),
            u128::from(vocab.value),
            u128::from(s.value),
        );
        let per_layer = 4 * (h * h + h) + 2 * (f * h) + f + h + 4 * h;
        let total = l * per_layer + 2 * vocab * p + (s + 2) * h + 2 * h * p + 2 * h;
        if total * 4 > u128::from(u64::MAX) {
            let field = spec
                .integer("hidden_size")
                .map(|f| span_of(f, spec))
                .unwrap_or(0..0);
            v.error(
                field,
                "hidden_size",
                "the model's byte count would overflow u64; these sizes are not realistic",
            );
        }
    }

    if v.cx.len() != errors_before {
        return None;
    }
    let int = |name: &str| spec.integer(name).map(|f| f.value);
    let tok = |name: &str| spec.token(name).map(|f| f.value);
    let boolean = |name: &str| spec.boolean(name).map(|f| f.value);
    let name = spec.name.as_ref()?.value.clone();
    Some(ModelDef {
        type_name: type_name(&name),
        feature: name.replace('.', "-"),
        aliases: spec
            .aliases
            .as_ref()?
            .value
            .iter()
            .map(|a| a.value.clone())
            .collect(),
        name_span: spec.name.as_ref().map(|f| span_of(f, spec))?,
        name,
        num_hidden_layers: int("num_hidden_layers")?,
        hidden_size: int("hidden_size")?,
        n_head: int("n_head")?,
        ffn_embed_dim: int("ffn_embed_dim")?,
        word_embed_proj_dim: int("word_embed_proj_dim")?,
        vocab_size: int("vocab_size")?,
        max_seq_len: int("max_seq_len")?,
        pad_token_id: tok("pad_token_id")?,
        bos_token_id: tok("bos_token_id")?,
        eos_token_id: tok("eos_token_id")?,
        activation: spec.activation.as_ref()?.value,
        layer_norm_eps: spec.layer_norm_eps.as_ref()?.value as f32,
        do_layer_norm_before: boolean("do_layer_norm_before")?,
        enable_bias: boolean("enable_bias")?,
        layer_norm_elementwise_affine: boolean("layer_norm_elementwise_affine")?,
        remove_final_layer_norm: boolean("remove_final_layer_norm")?,
        tie_word_embeddings: boolean("tie_word_embeddings")?,
        dtype: spec.dtype.as_ref()?.value,
    })
}

/// Where a field's value is written; a defaulted field points at the start of the file.
fn span_of<T>(field: &Field<T>, spec: &RawSpec) -> Range<usize> {
    field
        .span
        .clone()
        .unwrap_or(spec.document.start..spec.document.start)
}

struct Validator<'a, 'c> {
    file: &'a SpecFile,
    cx: &'c mut Ctxt,
}

impl Validator<'_, '_> {
    fn error(&mut self, span: Range<usize>, field: &str, reason: impl Into<String>) {
        self.cx.error_at(self.file, span, Some(field), reason);
    }

    fn name(&mut self, name: &str, span: Range<usize>) {
        if !is_model_name(name) {
            let reason = format!(
                "\"{name}\" is not a model name: use lower-case letters and digits in parts joined by '-' or '.', \
                 starting with a letter (e.g. \"opt-1.3b\")"
            );
            self.error(span, "name", reason);
        } else if name != self.file.stem() {
            let reason = format!(
                "name \"{name}\" differs from the file name; rename the file to `{name}.toml` or fix the name"
            );
            self.error(span, "name", reason);
        }
    }

    fn alias(&mut self, alias: &str, name: Option<&str>, span: Range<usize>) {
        if alias.trim().is_empty() || alias.contains('/') || alias.contains(char::is_whitespace) {
            let reason = format!(
                "alias \"{alias}\" must be a non-empty name without spaces or '/' (organisation prefixes are stripped \
                 before lookup)"
            );
            self.error(span, "aliases", reason);
        } else if alias != alias.to_ascii_lowercase() {
            let reason = format!(
                "alias \"{alias}\" must be lower case (names are lower-cased before lookup); write \"{}\"",
                alias.to_ascii_lowercase()
            );
            self.error(span, "aliases", reason);
        } else if Some(alias) == name {
            self.error(
                span,
                "aliases",
                format!("alias \"{alias}\" repeats the spec's own name"),
            );
        }
    }
}

/// Lower-case alphanumeric parts joined by '-' or '.', starting with a letter: such names map to valid Rust types.
fn is_model_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.split(['-', '.']).all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// `opt-1.3b` -> `Opt1_3b`, `galactica-30b` -> `Galactica30b`: each '-' part capitalised, '.' becomes '_'.
pub fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().replace('.', "_")
                }
                None => String::new(),
            }
        })
        .collect()
}

/// Checks what must hold across the directory: generated types, features and lookup names must be unambiguous.
pub fn validate_set(models: &[(usize, ModelDef)], files: &[SpecFile], cx: &mut Ctxt) {
    let mut types: BTreeMap<&str, &str> = BTreeMap::new();
    let mut features: BTreeMap<&str, &str> = BTreeMap::new();
    let mut lookup: BTreeMap<&str, &str> = BTreeMap::new();
    for (_, m) in models {
        lookup.insert(&m.name, &m.name);
    }
    for (file, m) in models {
        let file = &files[*file];
        let doc = m.name_span.clone();
        if let Some(other) = types.insert(&m.type_name, &m.name) {
            let reason = format!(
                "\"{}\" and \"{other}\" would both generate the type `{}`; rename one of them",
                m.name, m.type_name
            );
            cx.error_at(file, doc.clone(), Some("name"), reason);
        }
        if let Some(other) = features.insert(&m.feature, &m.name) {
            let reason = format!(
                "\"{}\" and \"{other}\" would both be selected by the feature `{}`; rename one of them",
                m.name, m.feature
            );
            cx.error_at(file, doc.clone(), Some("name"), reason);
        }
        for alias in &m.aliases {
            if let Some(other) = lookup.insert(alias, &m.name) {
                let reason = format!(
                    "alias \"{alias}\" of \"{}\" already names \"{other}\"; a name must resolve to one model",
                    m.name
                );
                cx.error_at(file, doc.clone(), Some("aliases"), reason);
            }
        }
    }
}

/// With feature gating on, every model's feature (and `all-models`) must be declared in the calling crate's
/// `[features]`: an undeclared one would only warn (`unexpected_cfgs`) and silently leave the model out.
pub fn validate_features(
    models: &[(usize, ModelDef)],
    files: &[SpecFile],
    declared: &[String],
    all_models: &str,
    cx: &mut Ctxt,
) {
    let is_declared = |f: &str| declared.iter().any(|d| d == f);
    if !models.is_empty() && !is_declared(all_models) {
        let (file, m) = &models[0];
        let reason = format!(
            "the Cargo feature `{all_models}` that selects every spec is not declared; add `{all_models} = [...]` \
             to [features] in Cargo.toml"
        );
        cx.error_at(&files[*file], m.name_span.clone(), None, reason);
    }
    for (file, m) in models {
        if !is_declared(&m.feature) {
            let reason = format!(
                "the Cargo feature `{}` that selects this spec is not declared; add `{} = []` to [features] in \
                 Cargo.toml (and list it in `{all_models}`)",
                m.feature, m.feature
            );
            cx.error_at(&files[*file], m.name_span.clone(), Some("name"), reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;

    fn check(text: &str) -> (Option<ModelDef>, Vec<String>) {
        let file = SpecFile::new("specs/opt-125m.toml", text);
        let mut cx = Ctxt::new();
        let raw = spec::parse(&file, &mut cx);
        let model = validate(&file, &raw, &mut cx, 0);
        (
            model,
            cx.into_diagnostics()
                .iter()
                .map(ToString::to_string)
                .collect(),
        )
    }

    #[test]
    fn a_good_spec_becomes_a_model() {
        let (model, errs) = check(spec::tests::OPT_125M);
        assert!(errs.is_empty(), "{errs:?}");
        let m = model.unwrap();
        assert_eq!(
            (m.type_name.as_str(), m.feature.as_str()),
            ("Opt125m", "opt-125m")
        );
        assert_eq!(
            (m.head_dim(), m.has_projection(), m.has_final_layer_norm()),
            (64, false, true)
        );
        assert_eq!(m.aliases, ["facebook-opt-125m"]);
    }

    #[test]
    fn type_and_feature_names() {
        assert_eq!(type_name("opt-1.3b"), "Opt1_3b");
        assert_eq!(type_name("opt-125m"), "Opt125m");
        assert_eq!(type_name("galactica-30b"), "Galactica30b");
        assert!(is_model_name("opt-iml-max-1.3b"));
        for bad in ["Opt-1b", "1opt", "opt--1", "opt-", "opt_1", "opt-1.", ""] {
            assert!(!is_model_name(bad), "{bad}");
        }
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = spec::tests::OPT_125M
            .replace("n_head = 12", "n_head = 7")
            .replace("num_hidden_layers = 12", "num_hidden_layers = 0")
            .replace("eos_token_id = 2", "eos_token_id = 50272");
        let (model, errs) = check(&text);
        assert!(model.is_none());
        assert_eq!(
            errs,
            [
                "specs/opt-125m.toml:3:21: `num_hidden_layers`: num_hidden_layers = 0: a model needs at least one decoder layer",
                "specs/opt-125m.toml:5:10: `n_head`: n_head = 7 does not divide hidden_size = 768 (each head gets hidden_size / n_head channels)",
                "specs/opt-125m.toml:12:16: `eos_token_id`: eos_token_id = 50272 is outside the vocabulary of 50272",
            ]
        );
    }

    #[test]
    fn parse_and_semantic_errors_come_together() {
        // A missing field does not hide a bad divisor elsewhere in the same file.
        let text = spec::tests::OPT_125M
            .replace("n_head = 12", "n_head = 5")
            .replace("dtype = \"float16\"\n", "");
        let (model, errs) = check(&text);
        assert!(model.is_none());
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("`dtype`: missing field"));
        assert!(errs[1].contains("`n_head`: n_head = 5 does not divide"));
    }

    #[test]
    fn the_name_must_match_the_file() {
        let text = spec::tests::OPT_125M.replace("name = \"opt-125m\"", "name = \"opt-13b\"");
        let (_, errs) = check(&text);
        assert_eq!(
            errs,
            ["specs/opt-125m.toml:1:8: `name`: name \"opt-13b\" differs from the file name; rename the file to `opt-13b.toml` or fix the name"]
        );
    }

    #[test]
    fn gated_specs_need_declared_features() {
        let file = SpecFile::new("specs/opt-125m.toml", spec::tests::OPT_125M);
        let model = check(spec::tests::OPT_125M).0.unwrap();
        let models = [(0, model)];
        let mut cx = Ctxt::new();
        let declared = ["all-models".to_owned(), "opt-125m".to_owned()];
        validate_features(
            &models,
            std::slice::from_ref(&file),
            &declared,
            "all-models",
            &mut cx,
        );
        assert!(cx.is_empty());
        validate_features(
            &models,
            std::slice::from_ref(&file),
            &declared[..1],
            "all-models",
            &mut cx,
        );
        let errs: Vec<String> = cx
            .into_diagnostics()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errs,
            ["specs/opt-125m.toml:1:8: `name`: the Cargo feature `opt-125m` that selects this spec is not declared; \
              add `opt-125m = []` to [features] in Cargo.toml (and list it in `all-models`)"]
        );
    }

    #[test]
    fn colliding_types_features_and_aliases_are_errors() {
        let mk = |name: &str, aliases: &[&str]| {
            let file = SpecFile::new(format!("d/{name}.toml"), "");
            let mut m = check(spec::tests::OPT_125M).0.unwrap();
            m.name = name.into();
            m.type_name = type_name(name);
            m.feature = name.replace('.', "-");
            m.aliases = aliases.iter().map(|a| a.to_string()).collect();
            (file, m)
        };
        let specs = [
            mk("opt-13b", &[]),
            mk("opt-1-3b", &["opt-13b"]),
            mk("opt-1.3b", &[]),
        ];
        let files: Vec<SpecFile> = specs.iter().map(|(f, _)| f.clone()).collect();
        let models: Vec<(usize, ModelDef)> =
            specs.into_iter().map(|(_, m)| m).enumerate().collect();
        let mut cx = Ctxt::new();
        validate_set(&models, &files, &mut cx);
        let errs: Vec<String> = cx
            .into_diagnostics()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errs,
            [
                "d/opt-1-3b.toml:1:1: `name`: \"opt-1-3b\" and \"opt-13b\" would both generate the type `Opt13b`; rename one of them",
                "d/opt-1-3b.toml:1:1: `aliases`: alias \"opt-13b\" of \"opt-1-3b\" already names \"opt-13b\"; a name must resolve to one model",
                "d/opt-1.3b.toml:1:1: `name`: \"opt-1.3b\" and \"opt-1-3b\" would both be selected by the feature `opt-1-3b`; rename one of them",
            ]
        );
    }
}
