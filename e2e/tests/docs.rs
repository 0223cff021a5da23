//! The `cargo run` commands the documents give, as a user copies them: each names a package (and
//! binary) that cargo can run, its subcommands exist, and every flag it passes is one the program
//! knows. Each command runs with `--help` in place of its own work, so nothing is started.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use servicekeel_e2e::paths;

/// The documents whose commands are checked.
const DOCUMENTS: [&str; 3] = ["README.md", "RELIABILITY.md", "BENCHMARKS.md"];

/// One `cargo run` invocation as written in a document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Invocation {
    package: String,
    bin: Option<String>,
    /// The words after `--` before the first flag: the subcommands.
    subcommands: Vec<String>,
    /// Every flag after `--`, without its value.
    flags: Vec<String>,
}

/// Every `cargo run …` in `text`: a command ends at a closing backtick, parenthesis or quote, or
/// at a shell comment; a line ending in `\` continues on the next.
fn invocations(text: &str) -> Vec<Invocation> {
    let joined = text.replace("\\\n", " ");
    let mut found = Vec::new();
    for (start, _) in joined.match_indices("cargo run") {
        let rest = &joined[start + "cargo run".len()..];
        let end = rest.find(['`', ')', '"', '#', '\n']).unwrap_or(rest.len());
        if let Some(invocation) = parse(&rest[..end]) {
            found.push(invocation);
        }
    }
    found
}

fn parse(command: &str) -> Option<Invocation> {
    let words: Vec<&str> = command
        .split_whitespace()
        .map(|word| word.trim_matches(['[', ']']))
        .filter(|word| !word.is_empty())
        .collect();
    let split = words.iter().position(|word| *word == "--");
    let (cargo_args, program_args) = match split {
        Some(at) => (&words[..at], &words[at + 1..]),
        None => (&words[..], &[][..]),
    };
    let value_of = |names: &[&str]| {
        cargo_args
            .iter()
            .position(|word| names.contains(word))
            .and_then(|at| cargo_args.get(at + 1))
            .map(|value| value.to_string())
    };
    let package = value_of(&["-p", "--package"])?;
    let bin = value_of(&["--bin"]);
    let subcommands = program_args
        .iter()
        .take_while(|word| !word.starts_with('-'))
        .map(|word| word.to_string())
        .collect();
    let flags = program_args
        .iter()
        .filter(|word| word.starts_with('-'))
        .map(|word| word.split('=').next().unwrap_or(word).to_string())
        .collect();
    Some(Invocation {
        package,
        bin,
        subcommands,
        flags,
    })
}

#[test]
fn the_parser_reads_commands_as_the_documents_write_them() {
    let text = "Run `cargo run --release -p pkg --bin tool [--pairs N]` and\n\
                ```sh\ncargo run -q -p other -- serve --listen 127.0.0.1:1 \\\n  --key=k # comment --not\n```\n\
                (`eval \"$(cargo run -q -p pkg -- up)\"`)";
    assert_eq!(
        invocations(text),
        vec![
            Invocation {
                package: "pkg".into(),
                bin: Some("tool".into()),
                subcommands: vec![],
                flags: vec![],
            },
            Invocation {
                package: "other".into(),
                bin: None,
                subcommands: vec!["serve".into()],
                flags: vec!["--listen".into(), "--key".into()],
            },
            Invocation {
                package: "pkg".into(),
                bin: None,
                subcommands: vec!["up".into()],
                flags: vec![],
            },
        ]
    );
}

#[test]
fn every_cargo_run_command_in_the_documents_runs_and_knows_its_flags() {
    let repo = paths::repo();
    let mut all = BTreeSet::new();
    for document in DOCUMENTS {
        let text = std::fs::read_to_string(repo.join(document)).unwrap();
        let found = invocations(&text);
        assert!(
            !found.is_empty() || document != "README.md",
            "README.md gives no cargo run command"
        );
        all.extend(found);
    }
    let mut failures = Vec::new();
    for invocation in &all {
        let mut command = paths::cargo();
        command.args(["run", "-q", "-p", &invocation.package]);
        if let Some(bin) = &invocation.bin {
            command.args(["--bin", bin]);
        }
        command
            .arg("--")
            .args(&invocation.subcommands)
            .arg("--help");
        let output = command.output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            failures.push(format!(
                "{invocation:?}: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
            continue;
        }
        for flag in &invocation.flags {
            let known = help
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(|word| word == flag || word.starts_with(&format!("{flag}=")));
            if !known {
                failures.push(format!(
                    "{invocation:?}: {flag} is not in its --help:\n{help}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
