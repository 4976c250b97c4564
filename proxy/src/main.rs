//! `tandem-proxy`: parse flags, start logging, run the proxy, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use tandem_proxy::{Cli, Command};

/// mimalloc segregates allocations by size, so the short-lived per-request buffers do not
/// fragment the heap around the long-lived per-connection state (with glibc malloc, 10,000
/// kept-alive connections cost several times their live size), and it returns freed memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad flags (EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    match cli.command {
        Command::Init(args) => match tandem_init::run(&args) {
            Ok(outcome) => {
                eprintln!("tandem-proxy init: {outcome:?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tandem-proxy init: {:#}", anyhow::Error::from(e));
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let logs = match tandem_proxy::logging::init(args.log_format, args.access_log) {
                Ok(logs) => logs,
                Err(e) => {
                    eprintln!("tandem-proxy: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.worker_threads.max(1))
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tandem-proxy: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tandem_proxy::run(*args, &logs)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %anyhow::Error::from(e), "tandem-proxy failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
