//! Where the control-plane binaries are: `$TANDEM_K8S_BIN` when set (the Makefile sets it),
//! otherwise whatever `tests/k8s/build.sh` prints, which builds them once per machine into
//! `~/.cache/tandem/k8s-v<release>-go<version>/bin` (a cold build takes many minutes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{Error, Result};

/// Environment variable naming a directory that holds `etcd`, `kube-apiserver` and
/// `kube-controller-manager`.
pub const BIN_DIR_ENV: &str = "TANDEM_K8S_BIN";

/// Paths of the control-plane binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// etcd.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, if all three are there.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let bins = Self {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kube_controller_manager: dir.join("kube-controller-manager"),
        };
        for path in [
            &bins.etcd,
            &bins.kube_apiserver,
            &bins.kube_controller_manager,
        ] {
            if !path.is_file() {
                return Err(Error::Binaries(format!("{} is missing", path.display())));
            }
        }
        Ok(bins)
    }

    /// Finds (or, on a fresh machine, builds) the binaries. The answer is computed once per
    /// process.
    pub fn locate() -> Result<Self> {
        static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let dir = DIR.get_or_init(|| bin_dir().map_err(|e| e.to_string()));
        match dir {
            Ok(dir) => Self::in_dir(dir),
            Err(message) => Err(Error::Binaries(message.clone())),
        }
    }
}

fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    // The build's progress goes to our stderr so a long cold build is visibly alive.
    let output = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| Error::io(format!("run {}", script.display()), source))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed ({})",
            script.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err(Error::Binaries(format!(
            "{} printed no directory",
            script.display()
        )));
    }
    Ok(PathBuf::from(dir))
}
