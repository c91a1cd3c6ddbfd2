//! docs/api.md against the binary: every documented command and flag
//! exists, every command the binary has is documented, and the metric
//! names documented are the ones `/metrics` exports; docs/operations.md's
//! metrics table explains each of them.

mod common;

use std::collections::BTreeSet;

use common::*;

fn api_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap()
}

/// The documented command lines: the fenced block whose lines start with
/// `rustci `, continuation lines joined to the line before.
fn documented_commands(doc: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            inside = !inside;
            continue;
        }
        if !inside {
            continue;
        }
        if line.starts_with("rustci ") {
            lines.extend(line.split(" | ").map(str::to_string));
        } else if line.starts_with(' ') && !lines.is_empty() {
            let last = lines.last_mut().unwrap();
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    lines
}

/// `rustci job get ID [--json]` -> (["job", "get"], ["--json"]); words
/// joined by `|` are alternatives of the last one.
fn path_and_flags(line: &str) -> (Vec<String>, Vec<String>) {
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let path: Vec<String> = words
        .iter()
        .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '|'))
        .map(|w| w.to_string())
        .collect();
    let flags = words
        .iter()
        .flat_map(|w| w.split(['[', ']', '(', ')']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches("...").to_string())
        .collect();
    (path, flags)
}

fn help(path: &[&str]) -> String {
    let out = run(&[path, &["--help"]].concat(), None);
    assert!(out.status.success(), "rustci {path:?} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The subcommands a help text lists.
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn the_documented_commands_and_flags_are_the_binarys() {
    let doc = api_md();
    let lines = documented_commands(&doc);
    assert!(lines.len() > 10, "the CLI block was found: {lines:?}");
    let mut documented = BTreeSet::new();
    for line in &lines {
        let (path, flags) = path_and_flags(line);
        assert!(!path.is_empty(), "{line}");
        let (last, parents) = path.split_last().unwrap();
        for alternative in last.split('|') {
            let mut full: Vec<&str> = parents.iter().map(String::as_str).collect();
            full.push(alternative);
            documented.insert(full.join(" "));
            let text = help(&full);
            for flag in &flags {
                assert!(
                    text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                    "docs/api.md documents `rustci {} {flag}`, which the binary does not have",
                    full.join(" ")
                );
            }
        }
    }
    // Every command of the binary is documented (its subcommands too).
    for top in subcommands(&help(&[])) {
        let subs = subcommands(&help(&[top.as_str()]));
        if subs.is_empty() {
            assert!(
                documented.contains(&top),
                "`rustci {top}` is not in docs/api.md"
            );
        }
        for sub in subs {
            let full = format!("{top} {sub}");
            assert!(
                documented.contains(&full),
                "`rustci {full}` is not in docs/api.md"
            );
        }
    }
}

#[test]
fn the_documented_metrics_are_the_exported_ones() {
    let doc = api_md();
    let mut documented = BTreeSet::new();
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("rustci_") && word.len() > 7 {
            documented.insert(word.to_string());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let (status, text) = http(&dev.addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(!exported.is_empty(), "{text}");
    let undocumented: Vec<&String> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/api.md: {undocumented:?}"
    );
    let missing: Vec<&String> = documented.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "in docs/api.md but not exported: {missing:?}"
    );
}

/// docs/operations.md says what each metric means and which to alert on:
/// its table names every exported metric, and its alert expressions name
/// only exported ones (a histogram's `_bucket` series included).
#[test]
fn operations_md_explains_every_exported_metric() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let start = doc
        .find("\n## Metrics\n")
        .expect("operations.md has a Metrics section");
    let section = &doc[start + 1..];
    let doc = section[..section.find("\n## ").unwrap_or(section.len())].to_string();
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &[]);
    let (status, text) = http(&dev.addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let in_table: BTreeSet<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `rustci_"))
        .flat_map(|l| l.split('|').nth(1).unwrap().split('`'))
        .filter(|w| w.starts_with("rustci_"))
        .map(|w| w.split('{').next().unwrap())
        .collect();
    let missing: Vec<_> = exported.difference(&in_table).collect();
    assert!(
        missing.is_empty(),
        "not in operations.md's table: {missing:?}"
    );
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("rustci_") || word.len() <= 7 {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .filter(|f| exported.contains(f))
            .unwrap_or(word);
        assert!(
            exported.contains(family),
            "operations.md names {word}, which /metrics does not export"
        );
    }
}
