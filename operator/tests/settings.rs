//! The binary refuses bad settings before it does anything else: exit code 64 and a message
//! naming the flag (no apiserver needed, none is contacted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tandem-operator"))
        .args(args)
        // Nowhere to connect: the settings must fail first.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("TANDEM_HTTP_ADDR", "127.0.0.1:0")
        .env("TANDEM_IDENTITY_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run tandem-operator");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_unknown_default_policy_exits_64_naming_the_flag() {
    let (code, stderr) = refused(&["--default-policy", "allow-all"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--default-policy \"allow-all\" is none of all-unauthenticated"),
        "{stderr}"
    );
}

#[test]
fn a_cluster_network_that_is_no_cidr_exits_64_naming_it() {
    let (code, stderr) = refused(&["--cluster-networks", "10.0.0.0/8,10.300.0.0/16"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("--cluster-networks: \"10.300.0.0/16\" is not a CIDR"),
        "{stderr}"
    );
}
