//! Holds the layer table of ARCHITECTURE.md: a module may use (`crate::…`) only modules of
//! lower layers. The table is read from the document itself, so the two cannot drift apart.

use std::collections::HashMap;
use std::path::Path;

/// `module → layer` from the `## Layers` table (rows `| n | `a`, `b` | … |`).
fn table() -> HashMap<String, u32> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .expect("a `## Layers` section in ARCHITECTURE.md");
    let mut layers = HashMap::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(n) = cells.get(1).and_then(|c| c.parse::<u32>().ok()) else {
            continue;
        };
        for m in cells[2].split(',') {
            layers.insert(m.trim().trim_matches('`').to_string(), n);
        }
    }
    layers
}

/// The top-level modules a source text names as `crate::<module>`.
fn uses(src: &str) -> Vec<String> {
    src.match_indices("crate::")
        .map(|(i, _)| {
            src[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn sources(p: &Path, out: &mut Vec<std::path::PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            sources(&e.path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

#[test]
fn modules_use_only_lower_layers() {
    let layers = table();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let name = entry
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if matches!(name.as_str(), "lib" | "main" | "layers") {
            continue;
        }
        let Some(&mine) = layers.get(&name) else {
            wrong.push(format!("module `{name}` is missing from the layer table"));
            continue;
        };
        seen += 1;
        let mut files = Vec::new();
        sources(&entry.path(), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for used in uses(&text) {
                if used == name {
                    continue;
                }
                match layers.get(&used) {
                    Some(&theirs) if theirs < mine => {}
                    Some(&theirs) => wrong.push(format!(
                        "{} (layer {mine}) uses `{used}` (layer {theirs})",
                        f.strip_prefix(&src).unwrap().display()
                    )),
                    None => wrong.push(format!("`{used}` is missing from the layer table")),
                }
            }
        }
    }
    assert!(seen >= 10, "only {seen} modules found");
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_uses() {
    assert_eq!(
        uses("use crate::db::Node; x crate::sys::files"),
        ["db", "sys"]
    );
}
