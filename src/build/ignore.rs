//! `.berthignore` / `.dockerignore` with Docker's rules: one pattern per line, `#` comments,
//! `!` re-includes, `**` matches any number of directories, `*` and `?` stay within one path
//! component, patterns are relative to the context root (a leading `/` is dropped), and a
//! pattern that matches a directory excludes everything under it. The last matching line
//! wins.

/// Ignore rules of a build context.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    components: Vec<String>,
    exclude: bool,
}

fn clean(pattern: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in pattern.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_string()),
        }
    }
    out
}

impl IgnoreRules {
    /// Parses an ignore file's text.
    pub fn parse(text: &str) -> Self {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (exclude, pat) = match l.strip_prefix('!') {
                    Some(p) => (false, p.trim()),
                    None => (true, l),
                };
                let components = clean(pat);
                (!components.is_empty()).then_some(Rule {
                    components,
                    exclude,
                })
            })
            .collect();
        IgnoreRules { rules }
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when the path (relative to the context, `/`-separated) is excluded.
    pub fn is_excluded(&self, path: &str) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let mut excluded = false;
        for rule in &self.rules {
            // A rule matches the path itself or any of its parent directories. Without
            // `**` it has a fixed depth: only the path's ancestor at that depth can match.
            let hit = if rule.components.iter().any(|c| c == "**") {
                (1..=parts.len()).any(|n| match_components(&rule.components, &parts[..n]))
            } else {
                let n = rule.components.len();
                n <= parts.len() && match_components(&rule.components, &parts[..n])
            };
            if hit {
                excluded = rule.exclude;
            }
        }
        excluded
    }

    /// True when some `!` rule could re-include something under `dir`: then an excluded
    /// directory must still be walked.
    pub fn may_reinclude_under(&self, dir: &str) -> bool {
        let parts: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
        self.rules
            .iter()
            .filter(|r| !r.exclude)
            .any(|r| prefix_could_match(&r.components, &parts))
    }
}

/// Can a path starting with `prefix` match `pattern`?
fn prefix_could_match(pattern: &[String], prefix: &[&str]) -> bool {
    match (pattern.first(), prefix.first()) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(p), Some(_)) if p == "**" => true,
        (Some(p), Some(c)) => {
            glob_component(p, c) && prefix_could_match(&pattern[1..], &prefix[1..])
        }
    }
}

fn match_components(pattern: &[String], path: &[&str]) -> bool {
    match pattern.first() {
        None => path.is_empty(),
        Some(p) if p == "**" => {
            (0..=path.len()).any(|skip| match_components(&pattern[1..], &path[skip..]))
        }
        Some(p) => {
            path.first().is_some_and(|c| glob_component(p, c))
                && match_components(&pattern[1..], &path[1..])
        }
    }
}

/// Matches one path component against a glob with `*`, `?`, `[...]` classes and `\`
/// escapes (Go's `filepath.Match` rules).
pub fn glob_component(pattern: &str, name: &str) -> bool {
    if !pattern.contains(['*', '?', '[', '\\']) {
        return pattern == name;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob_at(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(c) = n.first() else { return false };
            match class(&p[1..], *c) {
                Some((matched, rest)) => matched && glob_at(rest, &n[1..]),
                None => false,
            }
        }
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && glob_at(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && glob_at(&p[1..], &n[1..]),
    }
}

/// Matches `c` against a class body (after `[`); returns whether it matched and the pattern
/// after the closing `]`.
fn class(p: &[char], c: char) -> Option<(bool, &[char])> {
    let (negate, mut i) = match p.first() {
        Some('^') | Some('!') => (true, 1),
        _ => (false, 0),
    };
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, &p[i + 1..]));
        }
        first = false;
        let lo = if p[i] == '\\' && i + 1 < p.len() {
            i += 1;
            p[i]
        } else {
            p[i]
        };
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            let hi = p[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules() {
        let r = IgnoreRules::parse(
            "# comment\n*.md\n!README.md\nnode_modules\n**/*.log\n/tmp/\nbuild/**/cache\n",
        );
        assert!(r.is_excluded("notes.md"));
        assert!(!r.is_excluded("README.md"), "exception");
        assert!(
            !r.is_excluded("docs/notes.md"),
            "* does not cross directories"
        );
        assert!(
            r.is_excluded("node_modules/x/y.js"),
            "a directory excludes its contents"
        );
        assert!(
            r.is_excluded("a/b/c.log") && r.is_excluded("c.log"),
            "** matches zero or more dirs"
        );
        assert!(r.is_excluded("tmp/x"));
        assert!(r.is_excluded("build/cache") && r.is_excluded("build/a/b/cache/x"));
        assert!(!r.is_excluded("src/main.rs"));
    }

    #[test]
    fn last_match_wins_and_reinclusion_is_visible() {
        let r = IgnoreRules::parse("docs\n!docs/keep.txt\n");
        assert!(r.is_excluded("docs/other.txt"));
        assert!(!r.is_excluded("docs/keep.txt"));
        assert!(r.may_reinclude_under("docs"));
        assert!(!r.may_reinclude_under("src"));
    }

    #[test]
    fn globs() {
        assert!(glob_component("*.rs", "main.rs"));
        assert!(glob_component("ma?n.rs", "main.rs"));
        assert!(glob_component("[a-c]x", "bx") && !glob_component("[a-c]x", "dx"));
        assert!(glob_component("[^a-c]x", "dx"));
        assert!(glob_component("\\*", "*") && !glob_component("\\*", "a"));
        assert!(
            !glob_component("[abc", "a"),
            "an unterminated class matches nothing"
        );
    }
}
