//! Diagnostics for configuration files: each names a file and a span, carries a label and
//! help, and renders through miette with the offending source underlined.

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, SourceSpan};
use serde::Serialize;

/// One configuration file's name (as shown to the user) and text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path shown in diagnostics, relative to the project directory where possible.
    pub name: String,
    /// The file's full text.
    pub text: Arc<String>,
}

impl SourceFile {
    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

/// A problem found in a configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigDiagnostic {
    /// What is wrong, lower case, no trailing period.
    pub message: String,
    /// Short text under the underlined span.
    pub label: String,
    /// What to do about it.
    pub help: Option<String>,
    /// Stable identifier, e.g. `berth::unknown-key`.
    pub code: &'static str,
    /// The file the span points into.
    pub file: SourceFile,
    /// Byte range of the offending text.
    pub span: std::ops::Range<usize>,
}

impl fmt::Display for ConfigDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl miette::Diagnostic for ConfigDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.file as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = SourceSpan::from(self.span.start..self.span.end.max(self.span.start));
        Some(Box::new(std::iter::once(
            LabeledSpan::new_primary_with_span(Some(self.label.clone()), span),
        )))
    }
}

impl miette::SourceCode for SourceFile {
    fn read_span<'a>(
        &'a self,
        span: &SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        let contents =
            self.text
                .as_str()
                .read_span(span, context_lines_before, context_lines_after)?;
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name.clone(),
            contents.data(),
            *contents.span(),
            contents.line(),
            contents.column(),
            contents.line_count(),
        )))
    }
}

/// A machine-readable form of a diagnostic, for `--json`.
#[derive(Debug, Serialize)]
pub struct DiagnosticRecord<'a> {
    /// Stable identifier.
    pub code: &'a str,
    /// The message.
    pub message: &'a str,
    /// File name.
    pub file: &'a str,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Label under the span.
    pub label: &'a str,
    /// Suggested fix.
    pub help: Option<&'a str>,
}

impl ConfigDiagnostic {
    /// The record printed by `--json`.
    pub fn record(&self) -> DiagnosticRecord<'_> {
        let (line, column) = self.file.line_col(self.span.start);
        DiagnosticRecord {
            code: self.code,
            message: &self.message,
            file: &self.file.name,
            line,
            column,
            label: &self.label,
            help: self.help.as_deref(),
        }
    }

    /// `file:line:column`, for plain one-line output.
    pub fn location(&self) -> String {
        let (line, col) = self.file.line_col(self.span.start);
        format!("{}:{line}:{col}", self.file.name)
    }
}

/// Every problem found in a project's configuration, in file order.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(pub Vec<ConfigDiagnostic>);

impl Diagnostics {
    /// Adds a diagnostic unless an identical one (same file, span and message) is present:
    /// an error in `berth.toml` is found once per environment but reported once.
    pub fn push(&mut self, d: ConfigDiagnostic) {
        let dup = self
            .0
            .iter()
            .any(|e| e.file.name == d.file.name && e.span == d.span && e.message == d.message);
        if !dup {
            self.0.push(d);
        }
    }

    /// Adds every diagnostic of `other`.
    pub fn extend(&mut self, other: Diagnostics) {
        for d in other.0 {
            self.push(d);
        }
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts by file name, then position, so output is stable.
    pub fn sort(&mut self) {
        self.0
            .sort_by(|a, b| (&a.file.name, a.span.start).cmp(&(&b.file.name, b.span.start)));
    }
}

/// The error a command returns when the configuration is invalid (exit code 2).
#[derive(Debug, Clone, thiserror::Error)]
pub struct InvalidConfig {
    /// The problems, at least one.
    pub diagnostics: Diagnostics,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.diagnostics.0.len();
        let mut files: Vec<&str> = self
            .diagnostics
            .0
            .iter()
            .map(|d| d.file.name.as_str())
            .collect();
        files.dedup();
        let s = if n == 1 { "" } else { "s" };
        write!(f, "{n} problem{s} in {}", files.join(", "))
    }
}

impl miette::Diagnostic for InvalidConfig {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new("berth::invalid-config"))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        Some(Box::new(
            self.diagnostics
                .0
                .iter()
                .map(|d| d as &dyn miette::Diagnostic),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let f = SourceFile {
            name: "x.toml".into(),
            text: Arc::new("a = 1\nbé = 2\n".into()),
        };
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(6), (2, 1));
        assert_eq!(f.line_col(9), (2, 3));
    }
}
