//! Writes the generated API artefacts under the directory given (the Makefile passes
//! `manifests/`): `proxy-config.schema.json` and, with the `kube` feature, `crds/*.yaml`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: tandem-crdgen <manifests-dir>");
        return ExitCode::from(64);
    };
    match write_all(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tandem-crdgen: {err}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let schema = serde_json::to_string_pretty(&tandem_crds::contract::json_schema())? + "\n";
    std::fs::write(dir.join("proxy-config.schema.json"), schema)?;
    write_crds(dir)
}

#[cfg(feature = "kube")]
fn write_crds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let crd_dir = dir.join("crds");
    std::fs::create_dir_all(&crd_dir)?;
    for (file, yaml) in tandem_crds::v1alpha1::crd_yamls()? {
        std::fs::write(crd_dir.join(file), yaml)?;
    }
    Ok(())
}

#[cfg(not(feature = "kube"))]
fn write_crds(_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    Err("built without the `kube` feature: cannot generate CRDs".into())
}
