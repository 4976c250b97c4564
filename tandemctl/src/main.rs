//! `tandemctl`: everything lives in the library; see [`tandemctl::main`].

fn main() -> std::process::ExitCode {
    tandemctl::main()
}
