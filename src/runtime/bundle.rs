//! `berth bundle`: an OCI runtime bundle (`config.json` and `rootfs/`) that `runc run`
//! accepts, so berth's runtime and runc can be compared on the same input. The config is
//! what berth's runtime applies: the image's command, environment, working directory and
//! user; Docker's default capability set and device policy ([`super::devices`]); the runtime
//! spec's default namespaces, mounts and masked paths.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{Capability, LinuxCapabilitiesBuilder, Spec, UserBuilder};

use super::snapshot::{self, SnapshotError};
use super::users::resolve_user;
use crate::store::{Store, StoredImage};

/// Docker's default capability set for containers.
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The `PATH` a container gets when its image sets none (Docker's).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory is not empty.
    #[error("{} is not empty", .0.display())]
    NotEmpty(std::path::PathBuf),
    /// The image has neither ENTRYPOINT nor CMD.
    #[error(
        "the image has no command (neither ENTRYPOINT nor CMD); give one: berth bundle IMG DIR CMD…"
    )]
    NoCommand,
    /// The image's USER cannot be resolved.
    #[error("{0}")]
    User(String),
    /// The root filesystem could not be made.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Writing failed.
    #[error("cannot write {}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The device policy as runtime-spec cgroup rules: deny everything, then Docker's allow list.
fn device_rules() -> Vec<oci_spec::runtime::LinuxDeviceCgroup> {
    use super::devices::{DEFAULT_ALLOW, Kind};
    use oci_spec::runtime::{LinuxDeviceCgroupBuilder, LinuxDeviceType};
    let deny = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .expect("a device rule");
    let allow = DEFAULT_ALLOW.iter().map(|r| {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(match r.kind {
                Kind::Char => LinuxDeviceType::C,
                Kind::Block => LinuxDeviceType::B,
            })
            .access(r.access_letters());
        if let Some(m) = r.major {
            b = b.major(i64::from(m));
        }
        if let Some(m) = r.minor {
            b = b.minor(i64::from(m));
        }
        b.build().expect("a device rule")
    });
    std::iter::once(deny).chain(allow).collect()
}

/// Writes `image` as a bundle into `dir` (created if missing, else it must be empty), with
/// `hostname` as the container's host name. Returns the runtime spec written.
pub fn write_bundle(
    store: &Store,
    image: &StoredImage,
    dir: &Path,
    hostname: &str,
    command: &[String],
) -> Result<Spec, BundleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    // The process: the image's ENTRYPOINT, then `command` in place of its CMD when given
    // (as `docker run IMG CMD…`). Checked before anything is written.
    let cfg = image.config.oci.config().clone().unwrap_or_default();
    let mut args = cfg.entrypoint().clone().unwrap_or_default();
    if command.is_empty() {
        args.extend(cfg.cmd().clone().unwrap_or_default());
    } else {
        args.extend(command.iter().cloned());
    }
    if args.is_empty() {
        return Err(BundleError::NoCommand);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(BundleError::NotEmpty(dir.to_path_buf()));
    }
    let rootfs = dir.join("rootfs");
    std::fs::create_dir(&rootfs).map_err(io(&rootfs))?;
    snapshot::flatten(store, image, &rootfs)?;

    let mut env = cfg.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let user =
        resolve_user(&rootfs, cfg.user().as_deref().unwrap_or("")).map_err(BundleError::User)?;
    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .expect("capability sets are given");

    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_string()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(
        cfg.working_dir()
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
            .into(),
    );
    process.set_user(
        UserBuilder::default()
            .uid(user.uid)
            .gid(user.gid)
            .additional_gids(user.groups)
            .build()
            .expect("uid and gid are given"),
    );
    process.set_capabilities(Some(capabilities));
    process.set_no_new_privileges(Some(true));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    resources.set_devices(Some(device_rules()));
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let path = dir.join("config.json");
    let bytes = serde_json::to_vec_pretty(&spec).expect("a runtime spec serialises");
    std::fs::write(&path, bytes).map_err(io(&path))?;
    Ok(spec)
}
