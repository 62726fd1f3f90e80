//! Rebuilds the crate when a spec file is added to or removed from `model_specs/` (editing one is tracked by the
//! `include_str!` the macro emits; a new file is not, since proc macros cannot declare directory dependencies).
fn main() {
    for dir in ["model_specs", "tests/specs"] {
        // A path that does not exist would make cargo rerun this script on every build.
        if std::path::Path::new(dir).exists() {
            println!("cargo:rerun-if-changed={dir}");
        }
    }
}
