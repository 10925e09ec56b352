//! The layers a newcomer sees from the folder names, checked: a module imports only modules of
//! its own layer or below (`api` and `error`/`metrics` at the bottom, `runtime`, `cli` and `plugin`
//! at the top, the test fixtures `testing` above them all), and no two modules import each other.
//! Test code (`#[cfg(test)]` modules) is left out.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::string_slice
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first; a module may import its own rank or lower.
const RANKS: &[(&str, u8)] = &[
    ("error", 0),
    ("metrics", 0),
    ("api", 1),
    ("policy", 2),
    ("oauth", 3),
    ("mail", 3),
    ("controller", 4),
    ("server", 5),
    ("relay", 5),
    ("runtime", 6),
    ("cli", 7),
    ("plugin", 7),
    // The test fixtures (the `testing` feature) sit above everything: no production module may
    // import them.
    ("testing", 8),
];

fn rank(top: &str) -> Option<u8> {
    RANKS.iter().find(|(name, _)| *name == top).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/controller/binding.rs` → `controller::binding`.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap_or(file).with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod").collect();
    parts.join("::")
}

/// The code of a file without its test module (`#[cfg(test)]`, other attributes, `mod`) and its
/// comments (doc links name modules too).
fn production_code(text: &str) -> String {
    let test_module = text.match_indices("#[cfg(test)]\n").map(|(i, _)| i).find(|&i| {
        let mut rest = text[i..].lines().skip(1).map(str::trim_start);
        rest.find(|l| !l.starts_with("#[")).is_some_and(|l| l.starts_with("mod "))
    });
    let code = test_module.map_or(text, |i| &text[..i]);
    code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// Every `crate::a::b` a file names, as module paths of at most two segments, and `super::x`
/// resolved against the file's module.
fn imports(module: &str, code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let parent: Vec<&str> = module.split("::").collect();
    let parent = parent[..parent.len().saturating_sub(1)].join("::");
    for (prefix, base) in [("crate::", String::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .collect();
            let mut segments: Vec<&str> = base.split("::").filter(|s| !s.is_empty()).collect();
            for s in path.iter().take(if base.is_empty() { 2 } else { 1 }) {
                if s.is_empty() || s.chars().next().is_some_and(char::is_uppercase) {
                    break;
                }
                segments.push(s);
            }
            if !segments.is_empty() {
                found.insert(segments.join("::"));
            }
        }
    }
    found
}

#[test]
fn modules_import_only_their_layer_and_below_and_no_two_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let module = module_of(&root, file);
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let top = module.split("::").next().unwrap_or_default().to_owned();
        for imported in imports(&module, &production_code(&text)) {
            let imported_top = imported.split("::").next().unwrap_or_default();
            if let (Some(from), Some(to)) = (rank(&top), rank(imported_top))
                && to > from
            {
                upward.push(format!("{module} imports {imported} (a layer above)"));
            }
            if imported != module && !module.starts_with(&format!("{imported}::")) {
                graph.entry(module.clone()).or_default().insert(imported);
            }
        }
    }
    assert!(upward.is_empty(), "imports upward:\n{}", upward.join("\n"));
    let mut cycles = Vec::new();
    for (a, targets) in &graph {
        for b in targets {
            if a < b && graph.get(b).is_some_and(|t| t.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules importing each other:\n{}", cycles.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import_and_a_pair() {
    let found = imports("controller::binding", "use crate::server::authorize::start_link;\nuse super::cleanup;");
    assert!(found.contains("server::authorize"), "{found:?}");
    assert!(found.contains("controller::cleanup"), "{found:?}");
    assert_eq!(rank("server").zip(rank("controller")).map(|(s, c)| s > c), Some(true));
    let code = "use crate::api::X;\n#[cfg(test)]\n#[allow(clippy::panic)]\nmod tests {\n    use crate::testing::t;\n}";
    assert_eq!(production_code(code), "use crate::api::X;");
    let fixtures = imports("controller::binding", "use crate::testing::Fixed;");
    assert!(fixtures.contains("testing"), "{fixtures:?}");
    assert!(RANKS.iter().all(|(name, r)| *name == "testing" || rank("testing").is_some_and(|t| t > *r)));
}
