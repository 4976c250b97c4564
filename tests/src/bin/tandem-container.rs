//! `tandem-container SPEC.json`: becomes one container of a pod the node agent runs (see
//! `tandem_tests::node::shim`).

use std::process::ExitCode;

use tandem_tests::node::shim::{ShimSpec, become_container};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: tandem-container SPEC.json");
        return ExitCode::from(64);
    };
    let spec: ShimSpec = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("tandem-container: read {}: {e}", path.to_string_lossy());
            return ExitCode::from(64);
        }
    };
    match become_container(&spec) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("tandem-container: {e}");
            // 128 is what runtimes report for a container that could not start.
            ExitCode::from(128)
        }
    }
}
