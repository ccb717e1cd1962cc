//! berth: build an app's OCI image, ship it to a registry and promote the same digest
//! through fixed environments (dev → uat → prod).
//!
//! Dependencies flow one way: [`cli`] → pipeline modules → [`manifest`].

/// `eprintln!` that never panics: a closed stderr (`berth deploy 2>&1 | head`) must not
/// abort a release halfway; what cannot be written is dropped.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod background;
pub mod build;
pub mod cli;
pub mod deploy;
pub mod manifest;
pub mod names;
pub mod promote;
pub mod registry_client;
pub mod runtime;
pub mod store;
