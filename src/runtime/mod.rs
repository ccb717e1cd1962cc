//! The container runtime. So far: hostile-input-safe layer extraction ([`unpack`]), the
//! foundation of root filesystems; namespaces, cgroups and `berth run` are still to come.

pub mod unpack;
