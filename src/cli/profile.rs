//! `strata profile`.

/// Arguments of `strata profile`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`strata profile` is not built yet")
}
