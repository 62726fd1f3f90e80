//! Compile-fail tests (trybuild): wrong tensor shapes, each kind of bad spec, a failed const memory assertion.
//!
//! trybuild compiles each `tests/ui/*.rs` in its own project under `target/tests/trybuild/strata`, where
//! `CARGO_MANIFEST_DIR` points; the bad spec directories are copied there so the tests name them by the same
//! relative paths as in this repository, and the expected messages read `tests/ui/specs/...:line:col`.
//! Regenerate the `.stderr` files with `TRYBUILD=overwrite cargo test --test compile_fail` and read them.
#![cfg(feature = "all-models")]

use std::path::{Path, PathBuf};

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn ui() {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`; trybuild's project lives in `<target>/tests/trybuild/<crate>`.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let project: PathBuf = target
        .join("tests")
        .join("trybuild")
        .join(env!("CARGO_PKG_NAME"));
    let specs = project.join("tests").join("ui").join("specs");
    if specs.exists() {
        std::fs::remove_dir_all(&specs).expect("clear old spec copies");
    }
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/specs"),
        &specs,
    )
    .expect("copy bad specs");

    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
