//! Holds the layer table of ARCHITECTURE.md over the crates' manifests: a layer crate may
//! depend only on layer crates of lower layers. The compiler then holds every `use`: a crate
//! cannot name one it does not depend on. (Cargo alone refuses only cycles; without this test
//! `thali-dev` could start depending on `thali-http`.) The table is read from the document
//! itself, so the two cannot drift apart.

use std::collections::BTreeMap;
use std::path::Path;

/// `crate → layer` from the `## Layers` table (rows `| n | `thali-a`, `thali-b` | … |`).
fn table(doc: &str) -> BTreeMap<String, u32> {
    let section = doc
        .split("\n## Layers")
        .nth(1)
        .expect("a `## Layers` section in ARCHITECTURE.md");
    let mut layers = BTreeMap::new();
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

/// The `thali-*` crates a manifest's `[dependencies]` name.
fn thali_deps(manifest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && line.starts_with("thali-") {
            out.push(line.split(['=', ' ']).next().unwrap_or("").to_string());
        }
    }
    out
}

/// Every way `manifests` (crate name → manifest text) break `layers`.
fn violations(layers: &BTreeMap<String, u32>, manifests: &BTreeMap<String, String>) -> Vec<String> {
    let mut wrong = Vec::new();
    for (name, manifest) in manifests {
        let Some(&mine) = layers.get(name) else {
            wrong.push(format!("crate `{name}` is missing from the layer table"));
            continue;
        };
        for dep in thali_deps(manifest) {
            match layers.get(&dep) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => wrong.push(format!(
                    "{name} (layer {mine}) depends on {dep} (layer {theirs})"
                )),
                None => wrong.push(format!("`{dep}` is missing from the layer table")),
            }
        }
    }
    wrong
}

#[test]
fn crates_depend_only_on_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut manifests = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path().join("Cargo.toml")).unwrap();
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("a package name")
            .to_string();
        manifests.insert(name, text);
    }
    manifests.insert(
        "thali-node".into(),
        std::fs::read_to_string(root.join("node/Cargo.toml")).unwrap(),
    );
    assert!(
        manifests.len() >= 15,
        "only {} crates found",
        manifests.len()
    );
    let wrong = violations(&table(&doc), &manifests);
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

/// The checker itself, on a table and manifests that break it in each way it knows.
#[test]
fn the_checker_refuses_a_higher_or_unknown_dependency() {
    let doc = "x\n## Layers\n\n| layer | crates |\n|---|---|\n| 0 | `thali-sys` |\n| 1 | `thali-db` |\n| 2 | `thali-http` |\n\n## Next\n";
    let layers = table(doc);
    assert_eq!(layers.len(), 3);
    let manifests = BTreeMap::from([
        (
            "thali-db".to_string(),
            "[package]\nname = \"thali-db\"\n[dependencies]\nthali-sys = { workspace = true }\nthali-http = { workspace = true }\n[dev-dependencies]\nthali-http = { workspace = true }\n".to_string(),
        ),
        (
            "thali-http".to_string(),
            "[dependencies]\nthali-db = { workspace = true }\nthali-ghost = { path = \"x\" }\n".to_string(),
        ),
        ("thali-stray".to_string(), "[dependencies]\n".to_string()),
    ]);
    assert_eq!(
        violations(&layers, &manifests),
        [
            "thali-db (layer 1) depends on thali-http (layer 2)",
            "`thali-ghost` is missing from the layer table",
            "crate `thali-stray` is missing from the layer table",
        ]
    );
}
