//! `strata bench`.

/// Arguments of `strata bench`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`strata bench` is not built yet")
}
