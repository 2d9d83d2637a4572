//! Prints Gatehouse's CRDs as YAML; with `--write`, writes them into the Helm chart.
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use gatehouse_crds::crdgen;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        None => print!("{}", crdgen::all_yaml()?),
        Some("--write") => {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("crds/ has no parent directory")?;
            let dir = workspace.join(crdgen::CHART_CRDS_DIR);
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            for (file, crd) in crdgen::crds() {
                let path = dir.join(file);
                std::fs::write(&path, crdgen::to_yaml(&crd)?)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                eprintln!("crdgen: wrote {}", path.display());
            }
        }
        Some(other) => return Err(format!("unknown argument {other:?}; usage: crdgen [--write]").into()),
    }
    Ok(())
}
