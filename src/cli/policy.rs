//! `strata policy`.

/// Arguments of `strata policy`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`strata policy` is not built yet")
}
