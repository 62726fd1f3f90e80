//! The runtime's modules form no import cycle: every top-level module of `runtime/src`, and every module of
//! `runtime/src/offload`, depends only on modules that do not depend back on it. Read from the sources: paths in
//! code (`crate::x`, and `super::x` inside the offload folder), not in comments, and not in test modules (which may
//! use anything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The code of a source file: line comments dropped, and everything from its test module on.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `prefix` in `code`.
fn after(code: &str, prefix: &str) -> BTreeSet<String> {
    code.match_indices(prefix)
        .map(|(i, _)| {
            code[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// A cycle in `graph`, if any.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut found = path[i..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The module a file under `root` belongs to: its first path component, without `.rs`.
fn module_of(root: &Path, file: &Path) -> String {
    let first = file
        .strip_prefix(root)
        .unwrap()
        .components()
        .next()
        .unwrap();
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

#[test]
fn runtime_modules_have_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        let module = module_of(&src, &file);
        let deps = after(&code(&file), "crate::");
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != module));
    }
    assert!(
        graph.contains_key("offload") && graph["offload"].contains("model"),
        "the scan sees the modules: {graph:?}"
    );
    assert_eq!(cycle(&graph), None, "an import cycle among {graph:?}");
}

#[test]
fn offload_modules_have_no_import_cycles() {
    let offload = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/offload");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&offload) {
        let module = module_of(&offload, &file);
        if module == "mod" {
            continue;
        }
        let code = code(&file);
        let mut deps = after(&code, "crate::offload::");
        // `super::` names a sibling only in a file directly in the folder (in placement/, it names placement).
        if file.parent() == Some(offload.as_path()) {
            deps.extend(after(&code, "super::"));
        }
        let known: BTreeSet<String> = sources(&offload)
            .iter()
            .map(|f| module_of(&offload, f))
            .collect();
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(
            deps.into_iter()
                .filter(|d| *d != module && known.contains(d)),
        );
    }
    assert!(
        graph["schedule"].contains("run") && graph["run"].contains("placement"),
        "the scan sees the modules: {graph:?}"
    );
    assert_eq!(cycle(&graph), None, "an import cycle among {graph:?}");
}
