//! The container runtime. So far: hostile-input-safe layer extraction ([`unpack`]), layer
//! snapshots verified by diff_id and flattened root filesystems ([`snapshot`]), mount plans
//! applied through one syscall seam ([`mount`]), container root filesystems as overlays or
//! copies ([`rootfs`]), image users resolved inside the root ([`users`]) and OCI runtime
//! bundles for runc ([`bundle`]). Namespaces, cgroups and `berth run` are still to come.

pub mod bundle;
pub mod caps;
pub mod cgroup;
pub mod container;
pub mod init;
pub mod mount;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod snapshot;
pub mod unpack;
pub mod users;
