//! The hidden `strata completions SHELL` and `strata man [DIR]`: shell completion scripts and man pages generated
//! from the command line's own definition, so they never drift from it.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap_complete::Shell;

/// Arguments of `strata completions`.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum, value_name = "SHELL")]
    shell: Shell,
}

/// Arguments of `strata man`.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Write `strata.1` and one page per command (`strata-generate.1`, ...) into this directory instead of printing
    /// `strata.1` to stdout.
    #[arg(value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionsArgs, mut command: clap::Command) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "strata", &mut script);
    write_stdout(&script)
}

/// Prints the main man page, or writes every page into `args.dir`.
pub fn man(args: ManArgs, command: clap::Command) -> anyhow::Result<()> {
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            write_stdout(&page)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}
