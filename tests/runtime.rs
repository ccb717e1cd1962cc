//! The runtime's foundations against a real peer: a bundle berth writes runs under runc.

mod util;

use std::process::Command;

use util::{TempProject, require};

/// Removes a runc container when the test ends, also when it fails.
struct RuncContainer(String);

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.0])
            .output();
    }
}

#[test]
fn runc_runs_the_bundle_berth_writes() {
    require("runc", "runc");
    let p = TempProject::new();
    p.with_busybox_base();
    p.file(
        "berth.toml",
        "[app]\nname = \"rt\"\n[image]\nfrom = \"base:1\"\n[[image.steps]]\ncopy = [\"msg.txt\", \"/msg.txt\"]\n[[image.steps]]\nuser = \"www\"\n[[image.steps]]\nworkdir = \"/tmp\"\n[[image.steps]]\ncmd = [\"/bin/sh\", \"-c\", \"cat /msg.txt; id -u; id -g; pwd; hostname; test -e /etc/shadow || echo no-shadow\"]\n",
    )
    .file("msg.txt", "hello from a berth bundle\n");
    p.berth().args(["build"]).run().ok();
    let bundle = p.path().join("bundle");
    p.berth()
        .args(["bundle", "rt"])
        .args([&bundle])
        .args(["--hostname", "rt-host"])
        .run()
        .ok();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["process"]["user"]["uid"], 33,
        "USER www resolved in the image's /etc/passwd"
    );
    assert_eq!(config["process"]["noNewPrivileges"], true);

    let id = format!("berth-test-{}", std::process::id());
    let _cleanup = RuncContainer(id.clone());
    let out = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "runc failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "hello from a berth bundle\n33\n33\n/tmp\nrt-host\nno-shadow\n"
    );

    // A second bundle into the same directory is refused rather than mixed.
    let run = p
        .berth()
        .args(["bundle", "rt"])
        .args([&bundle])
        .run()
        .code(1);
    assert!(run.stderr.contains("is not empty"), "{}", run.stderr);
}
