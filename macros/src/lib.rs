//! Compiles strata's TOML model specs into typed Rust (placeholder: the real pipeline lands with the specs issue).
use proc_macro::TokenStream;

/// Generates one type per spec file in the given directory.
#[proc_macro]
pub fn include_specs(_input: TokenStream) -> TokenStream {
    TokenStream::new()
}
