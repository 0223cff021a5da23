//! Golden files for injection: every `golden/input/*.yaml` goes through the offline command's
//! code path (the same pure `inject` the server uses) and must equal `golden/expected/*.yaml`,
//! notes and warnings included. `UPDATE_GOLDEN=1 cargo test --test golden` rewrites the expected
//! files; review the diff before committing it.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use servicekeel_webhook::config::Config;
use servicekeel_webhook::offline::inject_documents;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn config() -> Config {
    Config::load(&golden_dir().join("config.yaml")).expect("golden config loads")
}

/// The text a golden file holds for one input: notes as comments, then the YAML, or the error.
fn render(input: &str, config: &Config) -> String {
    match inject_documents(input, "default", config) {
        Ok(output) => {
            let notes: String = output
                .notes
                .iter()
                .map(|n| format!("# document {} ({}): {}\n", n.document, n.object, n.outcome))
                .collect();
            format!("{notes}{}", output.yaml)
        }
        Err(error) => format!("# error: {error}\n"),
    }
}

fn inputs() -> Vec<PathBuf> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(golden_dir().join("input"))
        .expect("input dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "the golden spread went missing");
    inputs
}

#[test]
fn injected_output_matches_golden_files() {
    let config = config();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for input in inputs() {
        let text = std::fs::read_to_string(&input).expect("read input");
        let actual = render(&text, &config);
        let expected_path = golden_dir()
            .join("expected")
            .join(input.file_name().expect("name"));
        if update {
            std::fs::write(&expected_path, &actual).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if actual != expected {
            mismatches.push(format!(
                "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
                input.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn injecting_the_output_again_changes_nothing() {
    let config = config();
    for input in inputs() {
        let text = std::fs::read_to_string(&input).expect("read input");
        let Ok(first) = inject_documents(&text, "default", &config) else {
            continue;
        };
        let second = inject_documents(&first.yaml, "default", &config)
            .unwrap_or_else(|e| panic!("{}: second pass failed: {e}", input.display()));
        assert_eq!(second.yaml, first.yaml, "{}", input.display());
        assert!(
            second
                .notes
                .iter()
                .all(|n| n.outcome.starts_with("skipped")),
            "{}: {:?}",
            input.display(),
            second.notes
        );
    }
}
