//! What the bench crate's integration tests share.

use std::path::PathBuf;
use std::process::Command;

/// The tandem-proxy binary a test runs: `TANDEM_PROXY_BIN`, else the one in the test's own
/// target directory (`cargo test --workspace` builds it for the proxy's own tests), else one
/// built here with `cargo build -p tandem-proxy` (release for a release test build).
pub fn tandem_proxy() -> PathBuf {
    if let Some(path) = std::env::var_os("TANDEM_PROXY_BIN") {
        return PathBuf::from(path);
    }
    // A test runs as target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("tandem-proxy");
    if !binary.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "tandem-proxy", "--bin", "tandem-proxy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "cargo build -p tandem-proxy failed");
    }
    assert!(binary.is_file(), "no tandem-proxy at {}", binary.display());
    binary
}
