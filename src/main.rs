//! The `berth` binary: parse arguments, run, report the error chain, exit 0/1/2.

use std::process::ExitCode;

fn main() -> ExitCode {
    berth::cli::main()
}
