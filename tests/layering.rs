//! Keeps `lib.rs`'s module map true: every `crate::<module>` path in `src/` (outside test code)
//! names a module at or below its own in `herald::LAYERS`, so data flows one way. A failure names
//! the file, the line and the import that climbs.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`hub/channel.rs` → `hub`), or None for the crate
/// root, the binary and helper binaries, which may use anything.
fn module_of(rel: &Path) -> Option<String> {
    let mut parts = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let first = parts.next()?;
    if first == "bin" || first == "lib.rs" || first == "main.rs" {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// The code lines of a file, numbered, up to its first `#[cfg(test)]` (tests may reach
/// anywhere), with `//` comments removed.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = match line.find("//") {
            Some(c) => &line[..c],
            None => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

/// The modules a line names through `crate::`: `crate::hub::X`, `crate::{hub, sse::Y}`.
fn crate_refs(line: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        // `$crate::` in macros, or part of a longer identifier (`mycrate::`): not ours.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    refs.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.push(name);
            }
        }
    }
    refs
}

/// Items re-exported at the crate root (`crate::Result`, `crate::Config`): where they come from.
fn root_item(name: &str) -> Option<&'static str> {
    match name {
        "Error" | "Result" => Some("error"),
        "Config" => Some("config"),
        _ => None,
    }
}

/// Every import in `src/` that climbs the declared order, as `file:line: message`.
fn violations(src: &Path, layers: &[&str]) -> Vec<String> {
    let rank = |m: &str| layers.iter().position(|l| *l == m);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let Some(module) = module_of(rel) else {
            continue;
        };
        let Some(own) = rank(&module) else {
            found.push(format!(
                "src/{}: module `{module}` is not in herald::LAYERS; add it where it belongs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read file");
        for (line_no, line) in code_lines(&text) {
            for target in crate_refs(&line) {
                let target = root_item(&target).unwrap_or(&target).to_string();
                let Some(theirs) = rank(&target) else {
                    found.push(format!(
                        "src/{}:{line_no}: `crate::{target}` is not a module in herald::LAYERS",
                        rel.display()
                    ));
                    continue;
                };
                if theirs > own {
                    found.push(format!(
                        "src/{}:{line_no}: `{module}` imports `crate::{target}`, which comes after it in herald::LAYERS (data flows one way: {})",
                        rel.display(),
                        layers.join(" → ")
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src, herald::LAYERS);
    assert!(
        found.is_empty(),
        "{} import(s) climb the module order:\n{}",
        found.len(),
        found.join("\n")
    );
}

/// `lib.rs` declares its modules in the order of `LAYERS`, so the file reads as the map.
#[test]
fn lib_rs_declares_modules_in_layer_order() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("read lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        declared,
        herald::LAYERS,
        "lib.rs's `mod` lines and LAYERS disagree"
    );
}

/// The checker itself: an upward import is found and named; test code and comments are not.
#[test]
fn the_checker_finds_an_upward_import() {
    let dir = std::env::temp_dir().join(format!("herald-layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("low")).unwrap();
    std::fs::write(
        dir.join("low/mod.rs"),
        "//! low\nuse crate::high::Thing; // climbs\n// crate::high in a comment\n#[cfg(test)]\nmod tests { use crate::high::X; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("high.rs"),
        "use crate::{low, low::Y};\nuse crate::Result;\n",
    )
    .unwrap();
    let found = violations(&dir, &["error", "low", "high"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("src/low/mod.rs:2: `low` imports `crate::high`"),
        "{found:?}"
    );
}
