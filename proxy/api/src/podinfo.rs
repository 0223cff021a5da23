//! The downward-API annotations file, as the kubelet writes it: one `key="value"` line per
//! annotation, sorted by key, lines joined by `\n`, each value quoted the way Go's
//! `strconv.Quote` does (`\n`, `\"`, `\\`, `\t`, `\xNN`, `\uNNNN`, ... escapes). The sidecar reads
//! its pod's annotations from this file, never from the API server.

use std::collections::BTreeMap;
use std::fmt;

/// Why an annotations file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotations file line {line}: {message}")]
pub struct PodInfoError {
    pub line: usize,
    pub message: String,
}

/// Reads the whole file into a map of annotation keys to values.
pub fn parse_annotations(text: &str) -> Result<BTreeMap<String, String>, PodInfoError> {
    let mut annotations = BTreeMap::new();
    for (index, line) in text.split('\n').enumerate() {
        let number = index + 1;
        let error = |message: String| PodInfoError {
            line: number,
            message,
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let (key, quoted) = line
            .split_once('=')
            .ok_or_else(|| error("expected key=\"value\"".into()))?;
        if key.is_empty() {
            return Err(error("empty key".into()));
        }
        let value = unquote(quoted).map_err(error)?;
        annotations.insert(key.to_string(), value);
    }
    Ok(annotations)
}

/// Writes annotations in the kubelet's format (control characters escaped; other characters
/// as they are, which Go's unquoting accepts as well).
pub fn format_annotations(annotations: &BTreeMap<String, String>) -> String {
    annotations
        .iter()
        .map(|(key, value)| format!("{key}={}", Quoted(value)))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
                c if c.is_control() => write!(f, "\\u{:04x}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// Undoes Go's double-quoted string syntax.
fn unquote(quoted: &str) -> Result<String, String> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .filter(|_| quoted.len() >= 2)
        .ok_or_else(|| format!("value {} is not a double-quoted string", preview(quoted)))?;
    // Bytes, because `\xNN` escapes a byte; the result must be UTF-8 as a whole.
    let mut bytes = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Err("unescaped '\"' inside the value".into()),
            '\\' => {
                let escape = chars.next().ok_or("value ends in a lone backslash")?;
                let simple = match escape {
                    'a' => Some(0x07),
                    'b' => Some(0x08),
                    'f' => Some(0x0c),
                    'n' => Some(b'\n'),
                    'r' => Some(b'\r'),
                    't' => Some(b'\t'),
                    'v' => Some(0x0b),
                    '\\' => Some(b'\\'),
                    '"' => Some(b'"'),
                    '\'' => Some(b'\''),
                    _ => None,
                };
                if let Some(byte) = simple {
                    bytes.push(byte);
                    continue;
                }
                match escape {
                    'x' => bytes.push(hex(&mut chars, 2)? as u8),
                    'u' | 'U' => {
                        let digits = if escape == 'u' { 4 } else { 8 };
                        let code = hex(&mut chars, digits)?;
                        let c = char::from_u32(code)
                            .ok_or_else(|| format!("\\{escape}{code:x} is not a character"))?;
                        bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    '0'..='7' => {
                        let mut code = escape.to_digit(8).unwrap_or_default();
                        for _ in 0..2 {
                            let digit = chars
                                .next()
                                .and_then(|d| d.to_digit(8))
                                .ok_or("an octal escape needs three digits")?;
                            code = code * 8 + digit;
                        }
                        let byte = u8::try_from(code).map_err(|_| "octal escape over \\377")?;
                        bytes.push(byte);
                    }
                    other => return Err(format!("unknown escape \\{other}")),
                }
            }
            c => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    String::from_utf8(bytes).map_err(|_| "value is not UTF-8 once unescaped".into())
}

fn hex(chars: &mut std::str::Chars<'_>, digits: usize) -> Result<u32, String> {
    let mut code = 0u32;
    for _ in 0..digits {
        let digit = chars
            .next()
            .and_then(|d| d.to_digit(16))
            .ok_or_else(|| format!("a hex escape needs {digits} hex digits"))?;
        code = code * 16 + digit;
    }
    Ok(code)
}

fn preview(text: &str) -> String {
    const SHOWN: usize = 20;
    if text.chars().count() <= SHOWN {
        format!("{text:?}")
    } else {
        format!("{:?}...", text.chars().take(SHOWN).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_kubelet_writes() {
        // As Go's strconv.Quote renders these values, sorted by key.
        let text = concat!(
            "edge.io/imported-services=\"{\\\"services\\\": []}\"\n",
            "kubernetes.io/config.seen=\"2026-11-22T03:00:00.000000000Z\"\n",
            "odd=\"tab\\there, bell\\a, nul\\x00, del\\x7f, \\u00a0nbsp, caf\u{e9} \u{1f600}\"\n",
            "servicekeel.io/imported-services=\"services:\\n  - name: simple-server\\n    ports:\\n      - port: 8080\\n\""
        );
        let annotations = parse_annotations(text).unwrap();
        assert_eq!(annotations.len(), 4);
        assert_eq!(
            annotations["edge.io/imported-services"],
            r#"{"services": []}"#
        );
        assert_eq!(
            annotations["servicekeel.io/imported-services"],
            "services:\n  - name: simple-server\n    ports:\n      - port: 8080\n"
        );
        assert_eq!(
            annotations["odd"],
            "tab\there, bell\u{7}, nul\0, del\u{7f}, \u{a0}nbsp, caf\u{e9} \u{1f600}"
        );
    }

    #[test]
    fn round_trips() {
        let values = [
            "",
            "plain",
            "quote \" and backslash \\ and \\n literally",
            "lines\nand\r\ncarriage\ttabs",
            "controls \u{1}\u{1f}\u{7f}\u{85}",
            "unicode é ü 中文 🚀",
            "trailing backslash \\",
        ];
        let annotations: BTreeMap<String, String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("example.com/key-{i}"), v.to_string()))
            .collect();
        let text = format_annotations(&annotations);
        assert_eq!(
            text.lines().count(),
            values.len(),
            "one line per annotation"
        );
        assert_eq!(parse_annotations(&text).unwrap(), annotations);
    }

    #[test]
    fn octal_and_long_unicode_escapes() {
        let annotations = parse_annotations("k=\"\\101\\U0001F600\"").unwrap();
        assert_eq!(annotations["k"], "A\u{1f600}");
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let cases = [
            ("a=\"1\"\nno-equals", 2, "expected key=\"value\""),
            ("=\"x\"", 1, "empty key"),
            ("k=unquoted", 1, "is not a double-quoted string"),
            ("k=\"", 1, "is not a double-quoted string"),
            ("k=\"open", 1, "is not a double-quoted string"),
            ("k=\"a\"b\"", 1, "unescaped '\"'"),
            ("k=\"\\q\"", 1, "unknown escape \\q"),
            ("k=\"\\x4\"", 1, "needs 2 hex digits"),
            ("k=\"\\ud800\"", 1, "is not a character"),
            ("k=\"\\xff\"", 1, "not UTF-8"),
            ("k=\"\\400\"", 1, "octal escape over"),
            ("k=\"\\\"", 1, "lone backslash"),
        ];
        for (text, line, expected) in cases {
            let error = parse_annotations(text).expect_err(text);
            assert_eq!(error.line, line, "{text}");
            assert!(error.to_string().contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn empty_file_and_trailing_newline() {
        assert!(parse_annotations("").unwrap().is_empty());
        assert_eq!(parse_annotations("a=\"1\"\n").unwrap().len(), 1);
    }
}
