//! `berth completions SHELL` and `berth man`: generated from the clap definitions.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, CliError, Output};

/// Arguments of `berth completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: Shell,
}

/// Arguments of `berth man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write berth.1 and one page per command (berth-check.1, …) into DIR instead of
    /// printing berth.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Prints the completion script.
pub fn run_completions(args: &CompletionsArgs, out: &mut Output) -> Result<(), CliError> {
    if out.json {
        return Err(super::no_json(
            "`completions` (its output is a shell script)",
        ));
    }
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "berth", &mut std::io::stdout().lock());
    Ok(())
}

/// Prints or writes man pages.
pub fn run_man(args: &ManArgs, out: &mut Output) -> Result<(), CliError> {
    if out.json {
        return Err(super::no_json("`man` (its output is a man page)"));
    }
    let cmd = Cli::command();
    let Some(dir) = &args.out_dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    out.note(format!("wrote man pages to {}", dir.display()))?;
    Ok(())
}
