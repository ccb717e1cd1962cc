//! The container runtime. So far: hostile-input-safe layer extraction ([`unpack`]), layer
//! snapshots verified by diff_id and flattened root filesystems ([`snapshot`]), mount plans
//! applied through one syscall seam ([`mount`]), container root filesystems as overlays or
//! copies ([`rootfs`]), image users resolved inside the root ([`users`]) and OCI runtime
//! bundles for runc ([`bundle`]); containers started in their namespaces ([`process`],
//! [`instance`]), supervised when detached ([`supervisor`], [`logs`], [`health`]), on bridge networks
//! ([`network`], [`netlink`]) with published ports ([`proxy`]) and volumes ([`volume`]).

pub mod bundle;
pub mod caps;
pub mod cgroup;
pub mod container;
pub mod daemon;
pub mod devices;
pub mod exec;
pub mod health;
pub mod init;
pub mod instance;
pub mod logs;
pub mod mount;
pub mod netlink;
pub mod network;
pub mod process;
pub mod proxy;
pub mod rootfs;
pub mod rootless;
pub mod seccomp;
pub mod snapshot;
pub mod spec;
pub mod supervisor;
pub mod unpack;
pub mod users;
pub mod volume;
