//! `stratum`: one binary for the controller, the instance manager and the
//! local runtime. This file only parses arguments and wires crates together.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stratum",
    version,
    about = "Stratum: a Kubernetes operator for databases, and its local runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CustomResourceDefinition, or regenerate the deploy/
    /// directory with --out.
    Crds {
        /// The deploy/ directory: writes `crds/<crd name>.yaml` and the
        /// `stratum.yaml` bundle (CRDs + operator) instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out } => crds(out),
    }
}

fn crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = stratum::crds();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir.join("crds"))?;
            for (file, yaml) in crds {
                std::fs::write(dir.join("crds").join(file), yaml)?;
            }
            std::fs::write(dir.join("stratum.yaml"), stratum::bundle())?;
        }
        None => {
            let docs: Vec<String> = crds.into_iter().map(|(_, y)| y).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}
