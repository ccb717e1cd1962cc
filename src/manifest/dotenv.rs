//! `env_file`s: variables in dotenv syntax, as Docker Compose reads them. One `KEY=VALUE`
//! per line; blank lines and `#` comments skipped; an optional `export ` prefix; values
//! unquoted (trimmed, a ` #` starts a comment), in single quotes (literal) or in double
//! quotes (`\n`, `\t`, `\"`, `\\` escapes, may span lines).

use std::collections::BTreeMap;

/// A line that is not a variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct DotenvError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

/// Parses dotenv text into its variables (a later line overrides an earlier one).
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, DotenvError> {
    let mut out = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let number = i + 1;
        let line = lines[i].trim_start();
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let err = |why: &str| DotenvError {
            line: number,
            why: why.to_string(),
        };
        let (key, rest) = line
            .split_once('=')
            .ok_or_else(|| err("expected KEY=VALUE"))?;
        let key = key.trim();
        if !super::values::valid_env_name(key) {
            return Err(err(&format!("`{key}` is not a valid variable name")));
        }
        let rest = rest.trim_start();
        let value = if let Some(body) = rest.strip_prefix('\'') {
            let end = body
                .find('\'')
                .ok_or_else(|| err("a single quote is not closed"))?;
            body[..end].to_string()
        } else if let Some(body) = rest.strip_prefix('"') {
            // May continue over following lines until the closing quote.
            let mut raw = body.to_string();
            loop {
                if let Some(v) = unescape_until_quote(&raw) {
                    break v;
                }
                let Some(next) = lines.get(i) else {
                    return Err(err("a double quote is not closed"));
                };
                raw.push('\n');
                raw.push_str(next);
                i += 1;
            }
        } else {
            let v = match rest.find(" #") {
                Some(p) => &rest[..p],
                None => rest,
            };
            v.trim_end().to_string()
        };
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// The value of a double-quoted string whose opening quote is already consumed, if its
/// closing quote is in `s`.
fn unescape_until_quote(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_as_compose_reads_it() {
        let text = "# comment\n\nA=1\nexport B = two words  # trailing\nC='lit $X #no'\nD=\"a\\nb \\\"q\\\"\"\nE=\"multi\nline\"\nA=again\nEMPTY=\n";
        let v = parse(text).unwrap();
        assert_eq!(v["A"], "again");
        assert_eq!(v["B"], "two words");
        assert_eq!(v["C"], "lit $X #no");
        assert_eq!(v["D"], "a\nb \"q\"");
        assert_eq!(v["E"], "multi\nline");
        assert_eq!(v["EMPTY"], "");
        assert_eq!(parse("NOPE\n").unwrap_err().line, 1);
        assert_eq!(parse("A=1\n1X=2\n").unwrap_err().line, 2);
        assert!(parse("A=\"open\n").is_err());
    }
}
