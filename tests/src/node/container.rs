//! From a pod's container spec to a [`ShimSpec`]: the image-to-binary map, the command line
//! (`command`/`args` over the image's entrypoint/cmd, with `$(VAR)` expansion), the
//! environment (Service links, `env` with the downward API and ConfigMap keys) and the
//! security context. Pure: the caller supplies the ConfigMaps and Services it needs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Service};

use super::shim::{BindMount, ShimSpec};
use crate::{Error, Result};

/// What the node knows of an image: the programs in it (by name, as a `command` or the
/// entrypoint names them, mapped to binaries built here) and its config.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `USER` (the UID when the pod does not say).
    pub user: u32,
    /// Program name or path inside the image → the host binary.
    pub programs: BTreeMap<String, PathBuf>,
}

impl Image {
    fn program(&self, argv0: &str) -> Option<&PathBuf> {
        self.programs.get(argv0).or_else(|| {
            let base = Path::new(argv0).file_name()?.to_str()?;
            self.programs.get(base)
        })
    }
}

/// The node's image store: image reference → [`Image`].
#[derive(Debug, Clone, Default)]
pub struct Images(pub BTreeMap<String, Image>);

impl Images {
    /// The image `reference` names: exact, else by repository name without registry or tag.
    pub fn get(&self, reference: &str) -> Option<&Image> {
        self.0.get(reference).or_else(|| {
            let name = repository(reference);
            self.0
                .iter()
                .find(|(known, _)| repository(known) == name)
                .map(|(_, image)| image)
        })
    }
}

fn repository(reference: &str) -> &str {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let last = last.split('@').next().unwrap_or(last);
    last.split(':').next().unwrap_or(last)
}

/// What the runtime knows of the pod when it starts a container.
#[derive(Debug, Clone)]
pub struct PodContext<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Its address.
    pub pod_ip: Ipv4Addr,
    /// The node's address.
    pub host_ip: Ipv4Addr,
    /// The node's name.
    pub node_name: &'a str,
    /// The pod's network namespace file.
    pub netns: PathBuf,
    /// Volume name → its directory on the host.
    pub volumes: &'a BTreeMap<String, PathBuf>,
    /// The Services of the pod's namespace (for `*_SERVICE_HOST` variables).
    pub services: &'a [Service],
    /// ConfigMaps of the pod's namespace that `env` may reference.
    pub config_maps: &'a [ConfigMap],
}

/// The [`ShimSpec`] that runs `container` of the pod.
pub fn shim_spec(container: &Container, ctx: &PodContext<'_>, images: &Images) -> Result<ShimSpec> {
    let reference = container.image.as_deref().unwrap_or_default();
    let image = images.get(reference).ok_or_else(|| {
        Error::Unexpected(format!(
            "ErrImagePull: image {reference:?} is not on this node"
        ))
    })?;
    let env = environment(container, ctx)?;
    let argv = command_line(container, image, &env);
    let argv0 = argv
        .first()
        .ok_or_else(|| Error::Unexpected(format!("container {}: no command", container.name)))?;
    let program = image
        .program(argv0)
        .ok_or_else(|| {
            Error::Unexpected(format!(
                "container {}: executable {argv0:?} not found in image {reference}",
                container.name
            ))
        })?
        .clone();
    let pod_security = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let security = container.security_context.as_ref();
    let uid = security
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_security.and_then(|s| s.run_as_user))
        .map_or(Ok(image.user), u32::try_from)
        .map_err(|_| {
            Error::Unexpected(format!(
                "container {}: runAsUser out of range",
                container.name
            ))
        })?;
    let gid = security
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_security.and_then(|s| s.run_as_group))
        .map_or(Ok(uid), u32::try_from)
        .map_err(|_| {
            Error::Unexpected(format!(
                "container {}: runAsGroup out of range",
                container.name
            ))
        })?;
    let run_as_non_root = security
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod_security.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if run_as_non_root && uid == 0 {
        return Err(Error::Unexpected(format!(
            "CreateContainerConfigError: container {} has runAsNonRoot and would run as root",
            container.name
        )));
    }
    let capabilities = security
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|caps| {
            let drops_all = caps.drop.iter().flatten().any(|c| c == "ALL");
            drops_all.then(|| caps.add.clone().unwrap_or_default())
        });
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let source = ctx.volumes.get(&mount.name).ok_or_else(|| {
            Error::Unexpected(format!(
                "container {}: volume {} is not defined",
                container.name, mount.name
            ))
        })?;
        let source = match mount.sub_path.as_deref().filter(|p| !p.is_empty()) {
            Some(sub) if !sub.contains("..") => source.join(sub),
            Some(sub) => {
                return Err(Error::Unexpected(format!(
                    "subPath {sub:?} escapes the volume"
                )));
            }
            None => source.clone(),
        };
        mounts.push(BindMount {
            source,
            target: PathBuf::from(&mount.mount_path),
            read_only: mount.read_only.unwrap_or(false),
        });
    }
    Ok(ShimSpec {
        netns: ctx.netns.clone(),
        hostname: ctx.pod.metadata.name.clone().unwrap_or_default(),
        mounts,
        uid,
        gid,
        capabilities,
        no_new_privs: security.and_then(|s| s.allow_privilege_escalation) == Some(false),
        program,
        argv,
        env,
    })
}

/// Kubernetes' rule: `command` replaces the entrypoint (and drops the image's cmd), `args`
/// replaces cmd; `$(VAR)` in either is expanded from the container's environment.
pub fn command_line(container: &Container, image: &Image, env: &[(String, String)]) -> Vec<String> {
    let (entry, args) = match (&container.command, &container.args) {
        (Some(command), args) => (command.clone(), args.clone().unwrap_or_default()),
        (None, Some(args)) => (image.entrypoint.clone(), args.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    entry
        .iter()
        .chain(&args)
        .map(|s| expand(s, &vars))
        .collect()
}

/// `$(VAR)` expansion as the kubelet does it: a defined variable is replaced, `$$` is a
/// literal `$`, anything else is left as written.
pub fn expand(input: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) if vars.contains_key(&inner[..end]) => {
                    out.push_str(vars[&inner[..end]]);
                    rest = &inner[end + 1..];
                }
                Some(end) => {
                    out.push_str(&rest[pos..pos + 2 + end + 1]);
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(&rest[pos..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment in the kubelet's order: `PATH` and `HOSTNAME`, the Service
/// links of the namespace (unless `enableServiceLinks: false`), then `env` in order, each
/// value expanded against what came before.
pub fn environment(container: &Container, ctx: &PodContext<'_>) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        (
            "HOSTNAME".into(),
            ctx.pod.metadata.name.clone().unwrap_or_default(),
        ),
    ];
    let spec = ctx.pod.spec.as_ref();
    if spec.and_then(|s| s.enable_service_links).unwrap_or(true) {
        for (name, (ip, ports)) in super::services::service_links(ctx.services) {
            let prefix = name.to_uppercase().replace('-', "_");
            env.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
            if let Some((_, first)) = ports.first() {
                env.push((format!("{prefix}_SERVICE_PORT"), first.to_string()));
            }
            for (port_name, port) in &ports {
                if let Some(port_name) = port_name {
                    let suffix = port_name.to_uppercase().replace('-', "_");
                    env.push((format!("{prefix}_SERVICE_PORT_{suffix}"), port.to_string()));
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => {
                let vars: BTreeMap<&str, &str> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                expand(value, &vars)
            }
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    field_value(&field.field_path, ctx)?
                } else if let Some(key) = &from.config_map_key_ref {
                    let found = ctx
                        .config_maps
                        .iter()
                        .find(|cm| cm.metadata.name.as_deref() == Some(key.name.as_str()))
                        .and_then(|cm| cm.data.as_ref()?.get(&key.key).cloned());
                    match (found, key.optional) {
                        (Some(v), _) => v,
                        (None, Some(true)) => continue,
                        (None, _) => {
                            return Err(Error::Unexpected(format!(
                                "CreateContainerConfigError: configmap key {}/{} not found",
                                key.name, key.key
                            )));
                        }
                    }
                } else {
                    return Err(Error::Unexpected(format!(
                        "CreateContainerConfigError: env {}: only fieldRef and configMapKeyRef are supported on this node",
                        var.name
                    )));
                }
            }
            (None, None) => String::new(),
        };
        env.retain(|(k, _)| k != &var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// The downward API's `fieldRef` values.
fn field_value(path: &str, ctx: &PodContext<'_>) -> Result<String> {
    let meta = &ctx.pod.metadata;
    let spec = ctx.pod.spec.as_ref();
    let from_map = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => ctx.node_name.to_owned(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.to_string(),
        _ => from_map(&meta.labels, "metadata.labels['")
            .or_else(|| from_map(&meta.annotations, "metadata.annotations['"))
            .ok_or_else(|| Error::Unexpected(format!("fieldRef {path:?} is not supported")))?,
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expansion_replaces_defined_variables_and_keeps_the_rest() {
        let vars: BTreeMap<&str, &str> = [("HOST", "10.96.0.9"), ("PORT", "80")].into();
        assert_eq!(
            expand("http://$(HOST):$(PORT)/", &vars),
            "http://10.96.0.9:80/"
        );
        assert_eq!(
            expand("$(MISSING) $$(HOST) $x", &vars),
            "$(MISSING) $(HOST) $x"
        );
        assert_eq!(expand("tail $(", &vars), "tail $(");
    }

    #[test]
    fn command_replaces_the_entrypoint_and_args_replace_cmd() {
        let image = Image {
            entrypoint: vec!["/usr/local/bin/tandem-proxy".into()],
            cmd: vec!["run".into()],
            ..Image::default()
        };
        let c = |v: serde_json::Value| -> Container { serde_json::from_value(v).unwrap() };
        assert_eq!(
            command_line(&c(json!({"name": "p"})), &image, &[]),
            ["/usr/local/bin/tandem-proxy", "run"]
        );
        assert_eq!(
            command_line(
                &c(json!({"name": "p", "args": ["init", "--x"]})),
                &image,
                &[]
            ),
            ["/usr/local/bin/tandem-proxy", "init", "--x"]
        );
        assert_eq!(
            command_line(&c(json!({"name": "p", "command": ["sh"]})), &image, &[]),
            ["sh"]
        );
    }

    #[test]
    fn images_are_found_by_repository_whatever_the_registry_and_tag() {
        let images = Images([("tandem-proxy:0.1.0".to_owned(), Image::default())].into());
        assert!(images.get("ghcr.io/x/tandem-proxy:dev").is_some());
        assert!(images.get("tandem-webhook:0.1.0").is_none());
    }
}
