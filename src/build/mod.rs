//! The build engine: TOML steps and Dockerfiles compile to one step list
//! ([`plan::BuildPlan`]), which runs against the store to produce a reproducible OCI image.

pub mod archive;
pub mod cache;
pub mod chunked;
pub mod context;
pub mod copy;
pub mod dockerfile;
pub mod engine;
pub mod ignore;
pub mod imagefs;
pub mod import;
pub mod layer;
pub mod meta;
pub mod mounts;
pub mod plan;
pub mod provenance;
pub mod run;
pub mod scope;
pub mod shell_words;

pub use engine::{
    BuildEvent, BuildOptions, BuildOutput, PullPolicy, Puller, StepReport, StepStatus, build,
    find_or_pull,
};

use std::path::PathBuf;

use crate::store::StoreError;

/// Errors from building.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The context directory or a file in it cannot be read.
    #[error("cannot read {} in the build context", path.display())]
    Context {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A COPY/ADD source climbs out of the context.
    #[error("`{0}` is outside the build context")]
    OutsideContext(String),
    /// A COPY/ADD source does not exist (or is ignored).
    #[error("`{0}` does not exist in the build context (or is excluded by the ignore file)")]
    MissingSource(String),
    /// A source leads, through symlinks resolved inside the context, to a path that does
    /// not exist.
    #[error(
        "`{named}` resolves to `{resolved}` in the build context, which does not exist or is excluded by the ignore file (symlinks in a build context are followed inside the context, never to the host's files)"
    )]
    MissingResolved {
        /// The source as written.
        named: String,
        /// Where its symlinks lead, inside the context.
        resolved: String,
    },
    /// The context holds a device, FIFO or socket.
    #[error("`{0}` is a special file (device, FIFO or socket) and cannot be copied")]
    SpecialFile(String),
    /// A path is not UTF-8.
    #[error("{} is not valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),
    /// A local archive given to ADD cannot be extracted safely.
    #[error("cannot extract {}: {why}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// Why not.
        why: String,
    },
    /// A COPY destination cannot be used.
    #[error("cannot copy to {0}: {1}")]
    Destination(String, String),
    /// A `RUN --mount` cannot be made.
    #[error("{0}")]
    Mount(String),
    /// An `ADD` of a URL could not be fetched, or was not what `--checksum` said.
    #[error("{0}")]
    Fetch(String),
    /// A `COPY --from` source is not in that stage or image.
    #[error("`{path}` does not exist in {from}")]
    MissingInImage {
        /// The source as written.
        path: String,
        /// The stage or image.
        from: String,
    },
    /// A word (quotes, `$VAR`) cannot be processed.
    #[error("{0}")]
    Word(String),
    /// `--chown` names a user or group the image does not have.
    #[error("no user `{0}` in the image's /etc/passwd or /etc/group")]
    UnknownUser(String),
    /// The base image is not in the store.
    #[error(
        "image `{0}` is not in the store (pull it with `berth pull` or `--pull missing`, or make one with `berth import`)"
    )]
    UnknownBase(String),
    /// The image a build names could not be pulled.
    #[error("image `{name}` is not in the store, and pulling {reference} failed: {message}")]
    PullFailed {
        /// The name as written.
        name: String,
        /// What was pulled.
        reference: String,
        /// Why it failed.
        message: String,
    },
    /// `--target` names no stage.
    #[error("no build stage named `{0}`")]
    UnknownStage(String),
    /// A RUN step's command failed.
    #[error("RUN failed: {message}")]
    RunFailed {
        /// The command's exit code.
        code: i32,
        /// What happened.
        message: String,
    },
    /// The runtime could not run a RUN step.
    #[error("cannot run a RUN step: {0}")]
    Runtime(String),
    /// A step failed.
    #[error("{origin}: {text}")]
    Step {
        /// Where the step was written.
        origin: String,
        /// The instruction.
        text: String,
        /// What went wrong.
        #[source]
        source: Box<BuildError>,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
