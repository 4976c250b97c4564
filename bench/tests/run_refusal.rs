//! `tandem-bench run` refuses, before it starts anything, a run that would leave out a
//! topology the user did not leave out (issue 21): the binary itself, as `make bench` calls
//! it, with nothing measured (no timing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

/// `tandem-bench run --quick --out <dir> <args>` with no tandem-proxy in the environment.
fn run(out: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .arg("run")
        .arg("--quick")
        .arg("--out")
        .arg(out)
        .args(args)
        .env_remove("TANDEM_PROXY_BIN")
        .env_remove("QUICK")
        .output()
        .unwrap()
}

#[test]
fn run_without_tandem_proxy_and_without_skip_exits_64_naming_every_tandem_topology() {
    let out = tempfile::tempdir().unwrap();
    let output = run(out.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("tandem 1 hop: no tandem-proxy given"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tandem 2 hops: no tandem-proxy given"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tandem 2 hops mTLS: no tandem-proxy given"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--skip tandem1 --skip tandem2 --skip tandem2-mtls"),
        "{stderr}"
    );
    // Refused before anything ran: no descriptor limit raised, no report written.
    assert!(!stderr.contains("descriptor limit"), "{stderr}");
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn a_tandem_proxy_path_that_does_not_exist_is_named() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("target/release/tandem-proxy");
    let output = run(out.path(), &["--tandem-proxy", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("no tandem-proxy at {}", missing.display())),
        "{stderr}"
    );
}

#[test]
fn an_unknown_topology_name_is_a_usage_error_listing_the_names() {
    let out = tempfile::tempdir().unwrap();
    let output = run(out.path(), &["--skip", "tandem3"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "direct, pingora, haproxy, nginx, nginx2, nginx2-mtls, tandem1, tandem2, tandem2-mtls"
        ),
        "{stderr}"
    );
}
