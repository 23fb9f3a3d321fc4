//! `oxlet image pull|list|remove|import`.

use anyhow::Result;
use clap::Subcommand;
use std::path::Path;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull { reference: String },
}

pub fn run(_data_dir: &Path, cmd: ImageCommand) -> Result<()> {
    match cmd {
        ImageCommand::Pull { reference } => anyhow::bail!("image pull {reference}: not built yet"),
    }
}
