//! `DIR/thali.toml` (or `--config FILE`): every `thali serve` flag as a TOML key of the same
//! name (`peer = ["0.0.0.0:9898"]`, `max-document-size = 8000000`, `tor = true`), layered
//! file < environment (`THALI_<FLAG>`) < command line. The file is turned into flags that
//! clap parses like any other, so a value means the same wherever it comes from, and each key
//! is checked alone to report problems by line (`thali config check`).

use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The file's name inside the data directory.
pub const FILE_NAME: &str = "thali.toml";

/// Keys that cannot come from the file.
const NOT_IN_FILE: [&str; 2] = ["data", "config"];

/// One setting as flags.
struct Entry {
    key: String,
    line: usize,
    args: Vec<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// The serve command's long flags (`--name`), by name, with whether they take a value and may
/// repeat.
fn flags(serve: &clap::Command) -> BTreeMap<String, (bool, bool)> {
    serve
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let takes = a.get_action().takes_values();
            let many = matches!(a.get_action(), clap::ArgAction::Append);
            Some((long, (takes, many)))
        })
        .collect()
}

/// Reads a config file into flags; problems come back as `line N: …`.
fn entries(text: &str, serve: &clap::Command) -> Result<Vec<Entry>, Vec<String>> {
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
            return Err(vec![format!("line {line}: {}", e.message())]);
        }
    };
    let known = flags(serve);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (k, v) in table {
        let line = line_of(text, k.span().start);
        let key = k.get_ref().clone();
        let Some(&(takes, many)) = known.get(&key) else {
            problems.push(format!("line {line}: unknown key {key:?}"));
            continue;
        };
        if NOT_IN_FILE.contains(&key.as_str()) {
            problems.push(format!(
                "line {line}: {key:?} can only be given on the command line"
            ));
            continue;
        }
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            _ => None,
        };
        let args = match (v.get_ref(), takes, many) {
            (toml::Value::Boolean(true), false, _) => vec![format!("--{key}")],
            (toml::Value::Boolean(false), false, _) => Vec::new(),
            (_, false, _) => {
                problems.push(format!("line {line}: {key} is a switch: true or false"));
                continue;
            }
            (toml::Value::Array(items), true, true) => {
                let mut a = Vec::new();
                for item in items {
                    match scalar(item) {
                        Some(s) => a.push(format!("--{key}={s}")),
                        None => {
                            problems.push(format!("line {line}: {key} takes strings or numbers"))
                        }
                    }
                }
                a
            }
            (toml::Value::Array(_), true, false) => {
                problems.push(format!("line {line}: {key} takes one value, not a list"));
                continue;
            }
            (other, true, _) => match scalar(other) {
                Some(s) => vec![format!("--{key}={s}")],
                None => {
                    problems.push(format!("line {line}: {key} takes a string or a number"));
                    continue;
                }
            },
        };
        // Each key alone through clap, so a bad value is reported at its line.
        let mut alone = vec!["serve".to_string()];
        alone.extend(args.iter().cloned());
        if let Err(e) = serve.clone().try_get_matches_from(&alone) {
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            problems.push(format!("line {line}: {key}: {first}"));
            continue;
        }
        out.push(Entry { key, line, args });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        // In file order (the table came sorted by key).
        problems.sort_by_key(|p| {
            p.strip_prefix("line ")
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        });
        Err(problems)
    }
}

/// Where the file of a `serve` invocation is: `--config`, else `DIR/thali.toml`.
fn file_of(m: &clap::ArgMatches) -> Option<(PathBuf, bool)> {
    if let Some(p) = m.get_one::<PathBuf>("config") {
        return Some((p.clone(), true));
    }
    let data = m.get_one::<PathBuf>("data")?;
    Some((data.join(FILE_NAME), false))
}

/// The command line with the config file's settings added for every flag that neither the
/// command line nor the environment gave. Other subcommands pass through unchanged.
pub fn with_file(cmd: &clap::Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Ok(m) = cmd.clone().try_get_matches_from(&argv) else {
        return Ok(argv); // clap reports it
    };
    let Some(("serve", sm)) = m.subcommand() else {
        return Ok(argv);
    };
    let Some((path, named)) = file_of(sm) else {
        return Ok(argv);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => return Ok(argv),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let Some(serve) = cmd.find_subcommand("serve") else {
        return Ok(argv);
    };
    let entries =
        entries(&text, serve).map_err(|p| format!("{}:\n  {}", path.display(), p.join("\n  ")))?;
    let mut out = argv;
    for e in entries {
        let given = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(e.key.as_str()))
            .map(|a| a.get_id().as_str().to_string())
            .and_then(|id| sm.value_source(&id))
            .is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
        if !given {
            tracing::debug!(key = %e.key, line = e.line, "setting from the config file");
            out.extend(e.args.into_iter().map(OsString::from));
        }
    }
    Ok(out)
}

/// `thali config check`: every problem by line, or how many settings the file holds.
pub fn check(cmd: &clap::Command, path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let serve = cmd.find_subcommand("serve").ok_or("no serve command")?;
    match entries(&text, serve) {
        Ok(e) => Ok(format!("{}: ok, {} settings", path.display(), e.len())),
        Err(p) => Err(format!("{}:\n  {}", path.display(), p.join("\n  "))),
    }
}
