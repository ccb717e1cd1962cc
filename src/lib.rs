//! berth: build an app's OCI image, ship it to a registry and promote the same digest
//! through fixed environments (dev → uat → prod).
//!
//! Dependencies flow one way: [`cli`] → pipeline modules → [`manifest`].

pub mod build;
pub mod cli;
pub mod deploy;
pub mod manifest;
pub mod names;
pub mod promote;
pub mod registry_client;
pub mod runtime;
pub mod store;
