//! Small typed readers over the node tree. Each reader reports what is wrong as a
//! diagnostic on the node and returns `None`, so decoding goes on and every problem of a
//! file is found in one run.

use std::collections::BTreeMap;
use std::str::FromStr;

use super::diag::Diagnostics;
use super::node::{Node, Table, Value};

/// Collects diagnostics while typed values are read out of nodes.
#[derive(Default)]
pub struct Decoder {
    /// Everything found so far.
    pub diags: Diagnostics,
}

/// The closest candidate to `word`, if any is close enough to be a plausible typo: a
/// Jaro-Winkler similarity above 0.8 (as clap uses) or one edit away, transpositions
/// included (`wbe` → `web`).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            let jw = strsim::jaro_winkler(word, c);
            let one_edit = word.len() > 1 && strsim::osa_distance(word, c) <= 1;
            (if one_edit { jw.max(0.81) } else { jw }, c)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

impl Decoder {
    /// Reports a type mismatch on `node`.
    pub fn type_error(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.value.type_name();
        self.diags.push(node.diag(
            "berth::wrong-type",
            format!("`{path}` must be {expected}, not {found}"),
            format!("expected {expected}"),
        ));
    }

    /// Reports a value that has the right type but is not acceptable.
    pub fn invalid(
        &mut self,
        node: &Node,
        path: &str,
        why: impl Into<String>,
        help: Option<String>,
    ) {
        let mut d = node.diag("berth::invalid-value", format!("invalid `{path}`"), why);
        d.help = help;
        self.diags.push(d);
    }

    /// The table inside `node`, or a type error.
    pub fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n Table> {
        match &node.value {
            Value::Table(t) => Some(t),
            _ => {
                self.type_error(node, path, "a table");
                None
            }
        }
    }

    /// Reports every key of `table` that is not in `allowed`, suggesting the nearest one.
    pub fn known_keys(&mut self, table: &Table, allowed: &[&str], path: &str) {
        for key in table.keys() {
            if allowed.contains(&key.name.as_str()) {
                continue;
            }
            let place = if path.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in `{path}`")
            };
            let mut d = key.diag(
                "berth::unknown-key",
                format!("unknown key `{}` {place}", key.name),
                "unknown key",
            );
            d.help = Some(match suggest(&key.name, allowed.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("valid keys here: {}", allowed.join(", ")),
            });
            self.diags.push(d);
        }
    }

    /// A string value.
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    /// A string value parsed into `T`; parse failures are reported on the value.
    pub fn parsed<T: FromStr<Err = String>>(&mut self, node: &Node, path: &str) -> Option<T> {
        let s = self.string(node, path)?;
        self.parse_str(node, path, &s)
    }

    /// Parses `s` (read from `node`) into `T`, reporting a failure on `node`.
    pub fn parse_str<T: FromStr<Err = String>>(
        &mut self,
        node: &Node,
        path: &str,
        s: &str,
    ) -> Option<T> {
        match s.parse() {
            Ok(v) => Some(v),
            Err(why) => {
                self.invalid(node, path, why, None);
                None
            }
        }
    }

    /// A string or integer parsed into `T` (ports, sizes written either way).
    pub fn parsed_or_int<T: FromStr<Err = String>>(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<T> {
        match &node.value {
            Value::Integer(i) => self.parse_str(node, path, &i.to_string()),
            Value::String(s) => self.parse_str(node, path, s),
            _ => {
                self.type_error(node, path, "a string or an integer");
                None
            }
        }
    }

    /// An integer within `range`.
    pub fn int_in(
        &mut self,
        node: &Node,
        path: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        match &node.value {
            Value::Integer(i) if range.contains(i) => Some(*i),
            Value::Integer(i) => {
                let why = format!("{i} is outside {}..={}", range.start(), range.end());
                self.invalid(node, path, why, None);
                None
            }
            _ => {
                self.type_error(node, path, "an integer");
                None
            }
        }
    }

    /// A boolean.
    pub fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            _ => {
                self.type_error(node, path, "a boolean");
                None
            }
        }
    }

    /// The elements of an array.
    pub fn array<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Array(a) => Some(a),
            _ => {
                self.type_error(node, path, "an array");
                None
            }
        }
    }

    /// An array whose elements are each read by `item`; `None` if any element is bad.
    pub fn list<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let elems = self.array(node, path)?;
        let mut out = Vec::with_capacity(elems.len());
        let mut ok = true;
        for (i, e) in elems.iter().enumerate() {
            match item(self, e, &format!("{path}[{i}]")) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// An array of strings.
    pub fn string_list(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        self.list(node, path, |d, n, p| d.string(n, p))
    }

    /// A table of variables: names checked, values strings, integers, floats or booleans
    /// (written as their TOML text, as compose does with `environment:`).
    pub fn env_table(&mut self, node: &Node, path: &str) -> Option<BTreeMap<String, String>> {
        let table = self.table(node, path)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in &table.entries {
            let item_path = format!("{path}.{}", key.name);
            if !super::values::valid_env_name(&key.name) {
                let mut d = key.diag(
                    "berth::invalid-value",
                    format!("`{}` is not a valid variable name", key.name),
                    "invalid name",
                );
                d.help =
                    Some("names are letters, digits and `_`, not starting with a digit".into());
                self.diags.push(d);
                ok = false;
                continue;
            }
            let text = match &value.value {
                Value::String(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    self.type_error(value, &item_path, "a string, number or boolean");
                    ok = false;
                    continue;
                }
            };
            out.insert(key.name.clone(), text);
        }
        ok.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_but_not_unrelated_words() {
        let keys = ["replicas", "ports", "health", "volumes"];
        assert_eq!(suggest("replica", keys), Some("replicas"));
        assert_eq!(suggest("port", keys), Some("ports"));
        assert_eq!(suggest("helth", keys), Some("health"));
        assert_eq!(suggest("zzz", keys), None);
        assert_eq!(suggest("wbe", ["web", "api"]), Some("web"));
    }
}
