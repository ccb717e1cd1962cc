//! Compiles the container's tiny static init (`src/runtime/init/tiny_init.rs`) with the same
//! rustc, on its own: no_std, no libc, statically linked, a few kilobytes. berth embeds the
//! bytes (see `runtime::process`). On architectures it does not cover, an empty file is
//! embedded and berth runs its own binary as the init instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/runtime/init/tiny_init.rs";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=build.rs");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("berth-init");
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let supported = target.contains("linux")
        && (target.starts_with("x86_64-") || target.starts_with("aarch64-"));
    if !supported {
        std::fs::write(&out, b"").expect("write the empty init");
        return;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition=2024", "--crate-type=bin", "--target", &target])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "strip=symbols", "-C", "relocation-model=static"])
        .args([
            "-C",
            "target-feature=+crt-static",
            "-C",
            "link-arg=-nostartfiles",
        ])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .expect("run rustc for the container init");
    assert!(status.success(), "compiling {src} failed");
}
