//! The CLI's error: a miette report plus the exit class it maps to.

use std::io::IsTerminal;
use std::process::ExitCode;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme, Report};

use crate::manifest::ProjectError;

/// How a failure is reported in the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The operation was attempted and failed (exit 1).
    Failed,
    /// The input was wrong: bad usage, invalid configuration (exit 2).
    Invalid,
    /// Nothing went wrong that the user needs to hear about (a closed stdout pipe).
    Success,
    /// A specific code: the exit code of a container `berth run` ran.
    Code(u8),
}

/// A command's failure.
#[derive(Debug)]
pub struct CliError {
    /// Exit class.
    pub kind: ExitKind,
    /// What to print; `None` when the command already reported it (e.g. as JSON).
    pub report: Option<Report>,
}

impl CliError {
    /// A failed operation.
    pub fn failed(report: impl Into<Report>) -> Self {
        CliError {
            kind: ExitKind::Failed,
            report: Some(report.into()),
        }
    }

    /// Invalid input.
    pub fn invalid(report: impl Into<Report>) -> Self {
        CliError {
            kind: ExitKind::Invalid,
            report: Some(report.into()),
        }
    }

    /// A failure the command has already printed.
    pub fn reported(kind: ExitKind) -> Self {
        CliError { kind, report: None }
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        match self.kind {
            ExitKind::Success => 0,
            ExitKind::Code(c) => c,
            ExitKind::Failed => 1,
            ExitKind::Invalid => 2,
        }
    }

    /// The report's first line (for a JSON document).
    pub fn message(&self) -> String {
        self.report
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default()
    }

    /// Prints the report (unless it is a broken pipe) and returns the exit code.
    pub fn report(self) -> ExitCode {
        if let Some(report) = &self.report {
            crate::say!("{report:?}");
        }
        ExitCode::from(self.code())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader went away (`berth … | head`): not an error, as in ripgrep.
            return CliError {
                kind: ExitKind::Success,
                report: None,
            };
        }
        CliError::failed(Report::from_err(e))
    }
}

/// A [`ProjectError`] rendered with its help text.
#[derive(Debug)]
struct ProjectReport {
    inner: ProjectError,
    help: Option<String>,
}

impl std::fmt::Display for ProjectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for ProjectReport {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.inner)
    }
}

impl Diagnostic for ProjectReport {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }
}

impl From<ProjectError> for CliError {
    fn from(e: ProjectError) -> Self {
        match e {
            ProjectError::Invalid(invalid) => CliError::invalid(invalid),
            ProjectError::Io { .. } => CliError::failed(ProjectReport {
                help: None,
                inner: e,
            }),
            other => {
                let help = other.help();
                CliError::invalid(ProjectReport { inner: other, help })
            }
        }
    }
}

/// Renders reports with colour and Unicode on a terminal, and as plain text otherwise
/// (logs, CI, tests), so the text is stable and greppable.
pub fn install_report_handler() {
    let tty = std::io::stderr().is_terminal();
    let _ = miette::set_hook(Box::new(move |_| {
        let theme = if tty && std::env::var_os("NO_COLOR").is_none() {
            GraphicalTheme::unicode()
        } else if tty {
            GraphicalTheme::unicode_nocolor()
        } else {
            GraphicalTheme::none()
        };
        Box::new(GraphicalReportHandler::new_themed(theme).with_width(100))
    }));
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        let invalid = matches!(
            e,
            E::UnknownImage(_) | E::AmbiguousImage { .. } | E::BadTag(_)
        );
        let report = Report::from_err(e);
        if invalid {
            CliError::invalid(report)
        } else {
            CliError::failed(report)
        }
    }
}

impl From<crate::promote::ledger::LedgerError> for CliError {
    fn from(e: crate::promote::ledger::LedgerError) -> Self {
        CliError::failed(Report::from_err(e))
    }
}

impl From<crate::deploy::host::HostError> for CliError {
    fn from(e: crate::deploy::host::HostError) -> Self {
        CliError::failed(Report::from_err(e))
    }
}

impl From<crate::deploy::api::RequestError> for CliError {
    fn from(e: crate::deploy::api::RequestError) -> Self {
        CliError::invalid(Report::from_err(e))
    }
}

impl From<crate::promote::release::ReleaseError> for CliError {
    fn from(e: crate::promote::release::ReleaseError) -> Self {
        super::pipeline::release_error(e)
    }
}
