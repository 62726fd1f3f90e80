//! `strata specs`.

/// Arguments of `strata specs`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`strata specs` is not built yet")
}
