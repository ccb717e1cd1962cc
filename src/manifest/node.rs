//! A TOML document as a tree of spanned nodes that remember their file, and the merge of
//! an environment file onto `berth.toml`.
//!
//! Merging happens on this tree, before anything is typed, so the rule is one function:
//! tables merge key by key, everything else (scalars and arrays) is replaced. Every node
//! keeps the file it came from, so a diagnostic about a merged value points at the file
//! and line that set it.

use std::ops::Range;

use super::diag::{ConfigDiagnostic, Diagnostics, SourceFile};

/// A value with the file and byte range it was read from.
#[derive(Debug, Clone)]
pub struct Node {
    /// The file the value was written in.
    pub file: SourceFile,
    /// Byte range of the value in that file.
    pub span: Range<usize>,
    /// The value itself.
    pub value: Value,
}

/// A TOML value.
#[derive(Debug, Clone)]
pub enum Value {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A datetime, kept as written (berth's files use none).
    Datetime(String),
    /// An array.
    Array(Vec<Node>),
    /// A table, keys in file order.
    Table(Table),
}

impl Value {
    /// The TOML type name, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// A key with its own span (for "unknown key" diagnostics).
#[derive(Debug, Clone)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// The file the key was written in.
    pub file: SourceFile,
    /// Byte range of the key.
    pub span: Range<usize>,
}

/// A TOML table: entries in the order they were written.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Key/value pairs.
    pub entries: Vec<(Key, Node)>,
}

impl Table {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key and value under `key`.
    pub fn entry(&self, key: &str) -> Option<&(Key, Node)> {
        self.entries.iter().find(|(k, _)| k.name == key)
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries.iter().map(|(k, _)| k)
    }
}

impl Node {
    /// Builds a diagnostic pointing at this node.
    pub fn diag(
        &self,
        code: &'static str,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> ConfigDiagnostic {
        ConfigDiagnostic {
            message: message.into(),
            label: label.into(),
            help: None,
            code,
            file: self.file.clone(),
            span: self.span.clone(),
        }
    }

    /// The table inside, if this is one.
    pub fn as_table(&self) -> Option<&Table> {
        match &self.value {
            Value::Table(t) => Some(t),
            _ => None,
        }
    }
}

impl Key {
    /// Builds a diagnostic pointing at this key.
    pub fn diag(
        &self,
        code: &'static str,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> ConfigDiagnostic {
        ConfigDiagnostic {
            message: message.into(),
            label: label.into(),
            help: None,
            code,
            file: self.file.clone(),
            span: self.span.clone(),
        }
    }
}

/// Parses a file into a node tree. Syntax errors are all reported (the parser recovers
/// where it can); on any syntax error no tree is returned, since a half-read file would
/// produce misleading follow-on errors.
pub fn parse(file: &SourceFile) -> Result<Node, Diagnostics> {
    let (doc, errors) = toml::de::DeTable::parse_recoverable(file.text.as_str());
    if !errors.is_empty() {
        let mut diags = Diagnostics::default();
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            diags.push(ConfigDiagnostic {
                message: format!("invalid TOML: {}", e.message().trim_end_matches('\n')),
                label: "here".into(),
                help: Some("see https://toml.io for the syntax".into()),
                code: "berth::toml-syntax",
                file: file.clone(),
                span,
            });
        }
        return Err(diags);
    }
    let span = doc.span();
    let mut diags = Diagnostics::default();
    let table = convert_table(file, doc.into_inner(), &mut diags);
    if diags.is_empty() {
        Ok(Node {
            file: file.clone(),
            span,
            value: Value::Table(table),
        })
    } else {
        Err(diags)
    }
}

fn convert_table(file: &SourceFile, t: toml::de::DeTable<'_>, diags: &mut Diagnostics) -> Table {
    let mut entries = Vec::new();
    for (k, v) in t {
        let key = Key {
            name: k.get_ref().to_string(),
            file: file.clone(),
            span: k.span(),
        };
        entries.push((key, convert(file, v, diags)));
    }
    Table { entries }
}

fn convert(
    file: &SourceFile,
    v: toml::Spanned<toml::de::DeValue<'_>>,
    diags: &mut Diagnostics,
) -> Node {
    use toml::de::DeValue;
    let span = v.span();
    let value = match v.into_inner() {
        DeValue::String(s) => Value::String(s.into_owned()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(n) => Value::Integer(n),
                Err(_) => {
                    diags.push(ConfigDiagnostic {
                        message: "integer out of range".into(),
                        label: "does not fit in 64 bits".into(),
                        help: None,
                        code: "berth::toml-syntax",
                        file: file.clone(),
                        span: span.clone(),
                    });
                    Value::Integer(0)
                }
            }
        }
        DeValue::Float(f) => {
            let text = f.as_str().replace('_', "");
            let n = match text.trim_start_matches('+') {
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                "nan" | "-nan" => f64::NAN,
                t => t.parse().unwrap_or(f64::NAN),
            };
            Value::Float(n)
        }
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(a) => Value::Array(a.into_iter().map(|e| convert(file, e, diags)).collect()),
        DeValue::Table(t) => Value::Table(convert_table(file, t, diags)),
    };
    Node {
        file: file.clone(),
        span,
        value,
    }
}

/// Merges `over` onto `base`: where both are tables, keys merge one by one (recursively);
/// otherwise `over` replaces `base` whole. This is the only merge rule berth has.
pub fn merge(base: &Node, over: &Node) -> Node {
    match (&base.value, &over.value) {
        (Value::Table(b), Value::Table(o)) => {
            let mut entries = b.entries.clone();
            for (key, value) in &o.entries {
                match entries.iter_mut().find(|(k, _)| k.name == key.name) {
                    Some(slot) => *slot = (key.clone(), merge(&slot.1, value)),
                    None => entries.push((key.clone(), value.clone())),
                }
            }
            Node {
                file: over.file.clone(),
                span: over.span.clone(),
                value: Value::Table(Table { entries }),
            }
        }
        _ => over.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn file(name: &str, text: &str) -> SourceFile {
        SourceFile {
            name: name.into(),
            text: Arc::new(text.into()),
        }
    }

    fn render(n: &Node) -> String {
        match &n.value {
            Value::String(s) => format!("{s:?}"),
            Value::Integer(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Datetime(d) => d.clone(),
            Value::Array(a) => format!("[{}]", a.iter().map(render).collect::<Vec<_>>().join(",")),
            Value::Table(t) => format!(
                "{{{}}}",
                t.entries
                    .iter()
                    .map(|(k, v)| format!("{}={}", k.name, render(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    fn doc(text: &str) -> Node {
        parse(&file("t.toml", text)).unwrap()
    }

    #[test]
    fn tables_merge_key_by_key_and_lists_replace() {
        let base = doc("a = 1\nl = [1, 2]\n[t]\nx = 1\ny = 2\n[t.inner]\np = 1\n");
        let over = doc("l = [3]\n[t]\ny = 20\nz = 30\n[t.inner]\nq = 2\n");
        assert_eq!(
            render(&merge(&base, &over)),
            "{a=1,l=[3],t={x=1,y=20,inner={p=1,q=2},z=30}}"
        );
    }

    #[test]
    fn merged_nodes_remember_their_file() {
        let base = parse(&file("berth.toml", "[s]\nx = 1\ny = 2\n")).unwrap();
        let over = parse(&file("environments/uat.toml", "[s]\ny = 3\n")).unwrap();
        let merged = merge(&base, &over);
        let s = merged
            .as_table()
            .unwrap()
            .get("s")
            .unwrap()
            .as_table()
            .unwrap();
        assert_eq!(s.get("x").unwrap().file.name, "berth.toml");
        assert_eq!(s.get("y").unwrap().file.name, "environments/uat.toml");
    }

    #[test]
    fn merge_laws() {
        // Identity, idempotence and associativity over documents whose keys keep their
        // shape. (Where a key is a scalar in one file and a table in another, the merge is
        // not associative: `t = 5` wipes a table that a later table would have merged into.
        // berth only ever merges two files, so the two-file rule is all that matters.)
        let docs = [
            "",
            "a = 1",
            "a = [1]\n[t]\nx = 'a'",
            "[t]\nx = 'b'\n[t.u]\nv = true",
            "a = 2\n[t.u]\nw = 1.5",
        ];
        let empty = doc("");
        for a in docs {
            let a = doc(a);
            assert_eq!(render(&merge(&empty, &a)), render(&a));
            assert_eq!(render(&merge(&a, &empty)), render(&a));
            assert_eq!(render(&merge(&a, &a)), render(&a));
            for b in docs {
                let b = doc(b);
                for c in docs {
                    let c = doc(c);
                    assert_eq!(
                        render(&merge(&merge(&a, &b), &c)),
                        render(&merge(&a, &merge(&b, &c)))
                    );
                }
            }
        }
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let f = file("berth.toml", "[app]\nname = \n");
        let err = parse(&f).unwrap_err();
        assert!(!err.is_empty());
        let d = &err.0[0];
        assert_eq!(f.line_col(d.span.start).0, 2, "{d:?}");
    }
}
