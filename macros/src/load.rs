//! The macro's input and the file system: parses the call's arguments, reads the spec directory and runs the
//! parse -> validate -> expand pipeline over its files.

use std::path::{Path, PathBuf};

use proc_macro2::TokenStream;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitStr, Token};

use crate::diag::{Ctxt, SpecFile};
use crate::expand::{self, Expansion};
use crate::{spec, validate};

/// `include_specs!("dir")` or `include_specs!("dir", features)`.
pub struct Args {
    /// The directory, relative to `CARGO_MANIFEST_DIR`.
    pub dir: LitStr,
    /// Whether to gate each model behind its Cargo feature.
    pub features: bool,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let dir: LitStr = input.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected the spec directory as a string literal, e.g. `include_specs!(\"model_specs\")`",
            )
        })?;
        let mut features = false;
        if input.parse::<Option<Token![,]>>()?.is_some() && !input.is_empty() {
            let option: Ident = input.parse()?;
            if option != "features" {
                return Err(syn::Error::new(
                    option.span(),
                    format!("unknown option `{option}`; the only option is `features` (gate each model behind its Cargo feature)"),
                ));
            }
            features = true;
            input.parse::<Option<Token![,]>>()?;
        }
        if !input.is_empty() {
            return Err(input.error("unexpected tokens; expected `\"dir\"` or `\"dir\", features`"));
        }
        Ok(Args { dir, features })
    }
}

/// The macro: arguments in, items (or `compile_error!`s) out.
pub fn include_specs(input: TokenStream) -> TokenStream {
    let args: Args = match syn::parse2(input) {
        Ok(args) => args,
        Err(err) => return err.to_compile_error(),
    };
    let Some(manifest_dir) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return syn::Error::new(
            args.dir.span(),
            "CARGO_MANIFEST_DIR is not set; build with cargo",
        )
        .to_compile_error();
    };
    run(&args, Path::new(&manifest_dir))
}

/// Reads `args.dir` under `root` and generates its models.
pub fn run(args: &Args, root: &Path) -> TokenStream {
    let shown_dir = args.dir.value();
    let mut cx = Ctxt::new();
    let (files, tracked) = read_dir(
        &root.join(&shown_dir),
        shown_dir.trim_end_matches('/'),
        &mut cx,
    );
    let models = pipeline(&files, &mut cx);
    if args.features {
        if let Some(declared) = declared_features(&root.join("Cargo.toml")) {
            validate::validate_features(
                &models,
                &files,
                &declared,
                expand::ALL_MODELS_FEATURE,
                &mut cx,
            );
        }
    }
    expand::expand(&Expansion {
        models: models
            .into_iter()
            .map(|(i, m)| (files[i].shown.clone(), m))
            .collect(),
        tracked,
        errors: cx.into_diagnostics(),
        features: args.features,
        span: args.dir.span(),
    })
}

/// Parse and validate every file, then the set; returns the good models with the index of their file.
pub fn pipeline(files: &[SpecFile], cx: &mut Ctxt) -> Vec<(usize, validate::ModelDef)> {
    let mut models = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let before = cx.len();
        let raw = spec::parse(file, cx);
        if let Some(model) = validate::validate(file, &raw, cx, before) {
            models.push((i, model));
        }
    }
    validate::validate_set(&models, files, cx);
    models
}

/// The features declared in a crate's `Cargo.toml`, or `None` if it cannot be read (then nothing is checked: the
/// compiler's `unexpected_cfgs` lint still warns).
fn declared_features(manifest: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let features = table.get("features").and_then(toml::Value::as_table);
    Some(
        features
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default(),
    )
}

/// The `*.toml` files of a directory, sorted by name, and their absolute paths for `include_str!`.
fn read_dir(dir: &Path, shown: &str, cx: &mut Ctxt) -> (Vec<SpecFile>, Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            cx.error_path(
                shown,
                format!(
                    "cannot read the spec directory {} ({err}); the path is relative to the crate's Cargo.toml",
                    dir.display()
                ),
            );
            return (Vec::new(), Vec::new());
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
        .collect();
    paths.sort();
    if paths.is_empty() {
        cx.error_path(shown, "no `*.toml` spec files in this directory");
    }
    let mut files = Vec::new();
    let mut tracked = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shown_file = format!("{shown}/{name}");
        // Track even unreadable files, so fixing them rebuilds.
        tracked.push(path.to_string_lossy().into_owned());
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push(SpecFile::new(shown_file, text)),
            Err(err) => cx.error_path(&shown_file, format!("cannot read spec file: {err}")),
        }
    }
    (files, tracked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn arguments() {
        let args: Args = syn::parse2(quote!("model_specs", features)).unwrap();
        assert_eq!(
            (args.dir.value().as_str(), args.features),
            ("model_specs", true)
        );
        let args: Args = syn::parse2(quote!("specs",)).unwrap();
        assert!(!args.features);
        let err = syn::parse2::<Args>(quote!("specs", feature)).err().unwrap();
        assert!(err.to_string().contains("unknown option `feature`"));
        assert!(syn::parse2::<Args>(quote!(specs)).is_err());
    }

    #[test]
    fn reads_a_directory_and_reports_every_file() {
        let dir = std::env::temp_dir().join(format!("strata-macros-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("opt-125m.toml"), crate::spec::tests::OPT_125M).unwrap();
        let broken = crate::spec::tests::OPT_125M
            .replace("opt-125m", "opt-x")
            .replace("n_head = 12", "n_head = 0");
        std::fs::write(dir.join("opt-x.toml"), broken).unwrap();
        std::fs::write(dir.join("README.md"), "not a spec").unwrap();
        let args: Args = syn::parse2(quote!("specs")).unwrap();
        let root = dir.parent().unwrap();
        let rel = dir.file_name().unwrap().to_string_lossy().into_owned();
        let args = Args {
            dir: LitStr::new(&rel, args.dir.span()),
            ..args
        };
        let out = run(&args, root).to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        // The good spec is generated, the bad one reported with its place, both tracked, the README ignored.
        assert!(out.contains("pub struct Opt125m"), "{out}");
        assert!(
            out.contains(&format!(
                "{rel}/opt-x.toml:5:10: `n_head`: n_head = 0: must be at least 1"
            )),
            "{out}"
        );
        assert_eq!(out.matches("include_str").count(), 2);
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let args: Args = syn::parse2(quote!("no/such/dir")).unwrap();
        let out = run(&args, Path::new("/nonexistent-root")).to_string();
        assert!(out.contains("compile_error"), "{out}");
        assert!(
            out.contains("no/such/dir: cannot read the spec directory"),
            "{out}"
        );
    }
}
