//! `strata generate`.

/// Arguments of `strata generate`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`strata generate` is not built yet")
}
