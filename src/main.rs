//! The `berth` binary: parse arguments, run, report the error chain, exit 0/1/2.

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = berth::cli::main();
    // Cache files still being written on threads of their own.
    berth::background::finish();
    code
}
