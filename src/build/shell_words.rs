//! Docker's word processing for Dockerfile arguments: quotes, escapes and variable
//! expansion (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}`, `${VAR-default}`,
//! `${VAR+alt}`) in one pass, as BuildKit's shell lexer does. Single quotes are literal;
//! double quotes expand variables and honour `\"`, `\\` and `\$`.

/// A word that cannot be processed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WordError {
    /// A quote is never closed.
    #[error("unterminated {0} quote")]
    Unterminated(&'static str),
    /// `${` without `}`.
    #[error("unterminated ${{…}} in `{0}`")]
    UnterminatedBrace(String),
    /// `${VAR?message}` with VAR unset.
    #[error("{0}")]
    Required(String),
    /// An unsupported `${VAR<op>…}` form.
    #[error("unsupported substitution `{0}`")]
    Unsupported(String),
}

/// Processes one word: removes quotes and escapes, expands variables from `lookup`.
pub fn process_word(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, WordError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == escape {
            if let Some(&next) = chars.get(i + 1) {
                out.push(next);
                i += 2;
            } else {
                out.push(c);
                i += 1;
            }
        } else if c == '\'' {
            let end = chars[i + 1..]
                .iter()
                .position(|&c| c == '\'')
                .ok_or(WordError::Unterminated("single"))?;
            out.extend(&chars[i + 1..i + 1 + end]);
            i += end + 2;
        } else if c == '"' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(WordError::Unterminated("double")),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&e)
                        if e == escape
                            && matches!(chars.get(i + 1), Some(&n) if n == '"' || n == '$' || n == escape) =>
                    {
                        out.push(chars[i + 1]);
                        i += 2;
                    }
                    Some('$') => i = expand(&chars, i, &mut out, lookup)?,
                    Some(&c) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
        } else if c == '$' {
            i = expand(&chars, i, &mut out, lookup)?;
        } else {
            out.push(c);
            i += 1;
        }
    }
    Ok(out)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the variable at `chars[i] == '$'`; returns the index after it.
fn expand(
    chars: &[char],
    i: usize,
    out: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<usize, WordError> {
    match chars.get(i + 1) {
        Some('{') => {
            let close = chars[i + 2..]
                .iter()
                .position(|&c| c == '}')
                .ok_or_else(|| WordError::UnterminatedBrace(chars[i..].iter().collect()))?;
            let body: String = chars[i + 2..i + 2 + close].iter().collect();
            let name_len = body.chars().take_while(|&c| is_name_char(c)).count();
            let (name, rest) = body.split_at(name_len);
            let value = lookup(name);
            let expanded = match rest {
                "" => value.unwrap_or_default(),
                r if r.starts_with(":-") => value
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| r[2..].to_string()),
                r if r.starts_with('-') => value.unwrap_or_else(|| r[1..].to_string()),
                r if r.starts_with(":+") => value
                    .filter(|v| !v.is_empty())
                    .map(|_| r[2..].to_string())
                    .unwrap_or_default(),
                r if r.starts_with('+') => value.map(|_| r[1..].to_string()).unwrap_or_default(),
                r if r.starts_with(":?") || r.starts_with('?') => {
                    match value.filter(|v| !v.is_empty() || !r.starts_with(':')) {
                        Some(v) => v,
                        None => {
                            let msg = r.trim_start_matches(':')[1..].to_string();
                            return Err(WordError::Required(if msg.is_empty() {
                                format!("{name} is not set")
                            } else {
                                format!("{name}: {msg}")
                            }));
                        }
                    }
                }
                _ => return Err(WordError::Unsupported(format!("${{{body}}}"))),
            };
            out.push_str(&expanded);
            Ok(i + 3 + close)
        }
        Some(&c) if is_name_char(c) && !c.is_ascii_digit() => {
            let len = chars[i + 1..]
                .iter()
                .take_while(|&&c| is_name_char(c))
                .count();
            let name: String = chars[i + 1..i + 1 + len].iter().collect();
            out.push_str(&lookup(&name).unwrap_or_default());
            Ok(i + 1 + len)
        }
        _ => {
            out.push('$');
            Ok(i + 1)
        }
    }
}

/// Splits an argument string into words at unquoted whitespace, keeping quotes and escapes
/// in each word (they are processed later by [`process_word`]).
pub fn split_words(s: &str, escape: char) -> Result<Vec<String>, WordError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            None => {
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
    }
    match quote {
        Some('"') => Err(WordError::Unterminated("double")),
        Some(_) => Err(WordError::Unterminated("single")),
        None => {
            if !cur.is_empty() {
                words.push(cur);
            }
            Ok(words)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/root".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn w(s: &str) -> Result<String, WordError> {
        process_word(s, '\\', &env)
    }

    #[test]
    fn expansion_and_quotes() {
        assert_eq!(w("$HOME/x").unwrap(), "/root/x");
        assert_eq!(w("${HOME}x").unwrap(), "/rootx");
        assert_eq!(w("'$HOME'").unwrap(), "$HOME");
        assert_eq!(w("\"$HOME dir\"").unwrap(), "/root dir");
        assert_eq!(w("\\$HOME").unwrap(), "$HOME");
        assert_eq!(w("${NOPE:-def}").unwrap(), "def");
        assert_eq!(w("${EMPTY:-def}").unwrap(), "def");
        assert_eq!(w("${EMPTY-def}").unwrap(), "");
        assert_eq!(w("${HOME:+set}").unwrap(), "set");
        assert_eq!(w("${NOPE:+set}").unwrap(), "");
        assert_eq!(w("a\"b\\\"c\"").unwrap(), "ab\"c");
        assert_eq!(w("cost$").unwrap(), "cost$");
        assert!(matches!(
            w("${NOPE:?must be set}"),
            Err(WordError::Required(_))
        ));
        assert!(matches!(w("'open"), Err(WordError::Unterminated("single"))));
        assert!(matches!(w("${HOME"), Err(WordError::UnterminatedBrace(_))));
    }

    #[test]
    fn splitting_keeps_quoted_spaces_together() {
        let words = split_words(r#"a=1 b="two words" c='x y' d\ e"#, '\\').unwrap();
        assert_eq!(words, ["a=1", r#"b="two words""#, "c='x y'", r"d\ e"]);
        assert!(split_words("a=\"open", '\\').is_err());
    }
}
