//! `kubectl-tandem`: the same program as `tandemctl`, found by kubectl as the plugin for
//! `kubectl tandem …`.

fn main() -> std::process::ExitCode {
    tandemctl::main()
}
