//! The container runtime's last step, shared by the node agent (which writes a [`ShimSpec`])
//! and `tandem-container` (which reads it and becomes the container).
//!
//! A container here is a process that joins the pod's network namespace, gets a mount
//! namespace of its own with the pod's volumes bound at their mount paths, a UTS namespace
//! named after the pod, the user, group and capabilities its `securityContext` asks for, and
//! then `execve`s the program its image maps the command to. Doing it in a separate,
//! single-threaded process keeps all of this out of `pre_exec` (no `unsafe`).

use std::ffi::CString;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, execve, setgroups, setresgid, setresuid};
use serde::{Deserialize, Serialize};

/// Everything `tandem-container` needs to become one container of a pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    /// The pod's network namespace (a file under `/run/netns`).
    pub netns: PathBuf,
    /// The pod's name, set as the hostname.
    pub hostname: String,
    /// Volumes bound into the container.
    pub mounts: Vec<BindMount>,
    /// The user the process runs as.
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// For a root process: the only capabilities it keeps (`None` keeps root's).
    pub capabilities: Option<Vec<String>>,
    /// `allowPrivilegeEscalation: false`: set `no_new_privs`.
    pub no_new_privs: bool,
    /// The host file the image's program maps to.
    pub program: PathBuf,
    /// `argv`, with `argv[0]` as the container's command named it.
    pub argv: Vec<String>,
    /// The environment, in the order Kubernetes defines it.
    pub env: Vec<(String, String)>,
}

/// A volume mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindMount {
    /// The volume's directory on the host.
    pub source: PathBuf,
    /// Where the container sees it.
    pub target: PathBuf,
    /// `readOnly: true`.
    pub read_only: bool,
}

/// What can go wrong becoming the container.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A capability could not be parsed or changed.
    #[error("capabilities: {0}")]
    Caps(String),
    /// A string held a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Sys { what, source }
}

/// Joins the namespaces, sets up mounts and identity, and executes the program. Returns only
/// on failure.
pub fn become_container(spec: &ShimSpec) -> Result<std::convert::Infallible, ShimError> {
    let netns = std::fs::File::open(&spec.netns).map_err(|source| ShimError::Io {
        what: format!("open {}", spec.netns.display()),
        source,
    })?;
    setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys("join the pod network"))?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
        .map_err(sys("unshare mount and UTS namespaces"))?;
    nix::unistd::sethostname(&spec.hostname).map_err(sys("set the hostname"))?;
    // Private propagation, so the binds below never show up on the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make / private"))?;
    for bind in &spec.mounts {
        bind_mount(bind)?;
    }
    set_identity(spec)?;
    let program = cstring(&spec.program.display().to_string())?;
    let argv = spec
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    execve(&program, &argv, &env).map_err(sys(format!("execute {}", spec.program.display())))
}

fn cstring(s: &str) -> Result<CString, ShimError> {
    CString::new(s).map_err(|_| ShimError::Nul(s.to_owned()))
}

fn bind_mount(bind: &BindMount) -> Result<(), ShimError> {
    // The mount point must exist; on the host it is an empty directory (as a container
    // image's would be).
    create_mount_point(&bind.target)?;
    mount(
        Some(&bind.source),
        &bind.target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!(
        "bind {} at {}",
        bind.source.display(),
        bind.target.display()
    )))?;
    if bind.read_only {
        mount(
            None::<&str>,
            &bind.target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(sys(format!("make {} read-only", bind.target.display())))?;
    }
    Ok(())
}

fn create_mount_point(target: &Path) -> Result<(), ShimError> {
    std::fs::create_dir_all(target).map_err(|source| ShimError::Io {
        what: format!("create mount point {}", target.display()),
        source,
    })
}

fn set_identity(spec: &ShimSpec) -> Result<(), ShimError> {
    if spec.uid == 0
        && let Some(keep) = &spec.capabilities
    {
        restrict_root_capabilities(keep)?;
    }
    let gid = Gid::from_raw(spec.gid);
    setgroups(&[gid]).map_err(sys("set supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(sys("set the group"))?;
    // A non-root UID loses every capability here (no keep-caps): `drop: [ALL]`.
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).map_err(sys("set the user"))?;
    if spec.no_new_privs {
        nix::sys::prctl::set_no_new_privs().map_err(sys("set no_new_privs"))?;
    }
    Ok(())
}

/// Keeps only `keep` in the bounding set: on `execve` a root process's permitted and
/// effective sets become exactly the bounding set.
fn restrict_root_capabilities(keep: &[String]) -> Result<(), ShimError> {
    let keep = keep
        .iter()
        .map(|name| {
            let full = if name.starts_with("CAP_") {
                name.clone()
            } else {
                format!("CAP_{name}")
            };
            full.parse::<caps::Capability>()
                .map_err(|e| ShimError::Caps(format!("{name}: {e}")))
        })
        .collect::<Result<caps::CapsHashSet, _>>()?;
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, caps::CapSet::Bounding, cap)
                .map_err(|e| ShimError::Caps(format!("drop {cap}: {e}")))?;
        }
    }
    caps::set(None, caps::CapSet::Inheritable, &keep)
        .map_err(|e| ShimError::Caps(format!("set inheritable: {e}")))?;
    Ok(())
}
