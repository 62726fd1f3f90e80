//! Property tests: no spec text, however broken, makes the pipeline (parse -> validate -> generate) panic or hang.
//! Inputs are arbitrary text and valid specs with lines replaced, dropped, repeated or cut; each property runs for a
//! bounded time (arbtest's budget; `ARBTEST_BUDGET_MS=600000 cargo test -p strata-macros props` runs longer).

use arbitrary::{Result, Unstructured};
use proc_macro2::Span;

use crate::diag::{Ctxt, SpecFile};
use crate::expand::{expand, Expansion, ALL_MODELS_FEATURE};
use crate::load::pipeline;
use crate::validate::validate_features;

/// Milliseconds each property runs: 3 s in CI, `ARBTEST_BUDGET_MS` for longer runs.
fn budget_ms() -> u64 {
    std::env::var("ARBTEST_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// Values that stress each field's type and range.
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "7",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "1e400",
    "nan",
    "-inf",
    "0.0",
    "true",
    "\"\"",
    "\"opt-125m\"",
    "\"relu\"",
    "\"float16\"",
    "\"\u{1F980}\"",
    "[]",
    "[1, 2]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "'''multi\nline'''",
    "\"unterminated",
];

/// A valid spec with each line, possibly, replaced by `key = <stress value>`, dropped, repeated or cut short.
fn mutated_spec(u: &mut Unstructured<'_>, base: &str) -> Result<String> {
    let mut out = String::new();
    for line in base.lines() {
        match u.int_in_range(0..=9)? {
            0 => {}
            1 => {
                out.push_str(line);
                out.push('\n');
                out.push_str(line);
            }
            2 => {
                let key = line.split('=').next().unwrap_or("").trim();
                out.push_str(&format!("{key} = {}", u.choose(VALUES)?));
            }
            3 => {
                let cut = u.int_in_range(0..=line.len())?;
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| line.is_char_boundary(i))
                    .unwrap_or(0);
                out.push_str(&line[..cut]);
            }
            4 => {
                out.push_str(line);
                out.push_str(&format!("\n{} = {}", short_string(u)?, u.choose(VALUES)?));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

/// An arbitrary key of up to 12 characters.
fn short_string(u: &mut Unstructured<'_>) -> Result<String> {
    let len = u.int_in_range(0..=12)?;
    (0..len).map(|_| u.arbitrary::<char>()).collect()
}

/// Runs the whole pipeline on `files` as the macro does; panics only if the pipeline does.
fn run_pipeline(files: &[SpecFile], features: bool) {
    let mut cx = Ctxt::new();
    let models = pipeline(files, &mut cx);
    if features {
        let declared = vec![ALL_MODELS_FEATURE.to_owned(), "opt-125m".to_owned()];
        validate_features(&models, files, &declared, ALL_MODELS_FEATURE, &mut cx);
    }
    let had_errors = !cx.is_empty();
    let output = expand(&Expansion {
        models: models
            .into_iter()
            .map(|(i, m)| (files[i].shown.clone(), m))
            .collect(),
        tracked: Vec::new(),
        errors: cx.into_diagnostics(),
        features,
        span: Span::call_site(),
    })
    .to_string();
    // Every error reaches the user.
    assert!(!had_errors || output.contains("compile_error"), "{output}");
}

/// File names the specs may have: matching, clashing, odd.
const NAMES: &[&str] = &[
    "opt-125m",
    "opt-x",
    "OPT 1.3b",
    "",
    "\u{e9}t\u{e9}",
    "a.b.c",
];

#[test]
fn arbitrary_text_never_panics() {
    arbtest::arbtest(|u| {
        let count = u.int_in_range(1..=3)?;
        let mut files = Vec::new();
        for _ in 0..count {
            let name = u.choose(NAMES)?;
            let text: String = u.arbitrary()?;
            files.push(SpecFile::new(format!("specs/{name}.toml"), text));
        }
        run_pipeline(&files, u.arbitrary()?);
        Ok(())
    })
    .budget_ms(budget_ms());
}

#[test]
fn broken_specs_never_panic() {
    let base = crate::spec::tests::OPT_125M;
    arbtest::arbtest(|u| {
        let count = u.int_in_range(1..=3)?;
        let mut files = Vec::new();
        for _ in 0..count {
            let name = u.choose(NAMES)?;
            files.push(SpecFile::new(
                format!("specs/{name}.toml"),
                mutated_spec(u, base)?,
            ));
        }
        run_pipeline(&files, u.arbitrary()?);
        Ok(())
    })
    .budget_ms(budget_ms());
}
