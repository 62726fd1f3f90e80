//! `tiers::cleanup_all` (what a Ctrl-C handler calls) removes every offload file and every offload dir strata
//! created. In its own test binary because it empties the process-wide registry, which would pull files from under
//! tests running beside it.

use strata_runtime::tiers::{cleanup_all, DiskOptions, DiskTier};

#[test]
fn cleanup_all_removes_files_and_created_dirs_only() {
    let tmp = tempfile::tempdir().unwrap();
    let created = tmp.path().join("offload");
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("user-file"), b"keep me").unwrap();

    let a = DiskTier::new(DiskOptions::new(&created)).unwrap();
    let b = DiskTier::new(DiskOptions::new(&existing)).unwrap();
    let tensors: Vec<_> = (0..3)
        .flat_map(|i| {
            [
                a.write(&format!("a{i}"), &[i; 100]).unwrap(),
                b.write(&format!("b{i}"), &[i; 10]).unwrap(),
            ]
        })
        .collect();
    let paths: Vec<_> = tensors.iter().map(|t| t.path().to_owned()).collect();
    assert!(paths.iter().all(|p| p.is_file()));

    let done = cleanup_all();
    assert_eq!(done.files, 6, "{done:?}");
    assert_eq!(done.dirs, 1, "{done:?}");
    assert_eq!(done.runs, 2, "{done:?}");
    assert!(paths.iter().all(|p| !p.exists()));
    assert!(!created.exists(), "the dir strata created is removed");
    assert!(
        existing.join("user-file").is_file(),
        "files strata did not write are kept"
    );
    assert_eq!(
        std::fs::read_dir(&existing).unwrap().count(),
        1,
        "the run directory is gone"
    );

    // Dropping the tensors and tiers afterwards is harmless, and a second cleanup finds nothing.
    drop(tensors);
    drop((a, b));
    assert_eq!(cleanup_all().files, 0);
}
