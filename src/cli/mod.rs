//! Argument parsing and dispatch; each subcommand lives in its own module with its `Args` and `run`.
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod auto;
mod bench;
mod bench_kernels;
mod bench_predict;
mod bench_serve;
mod bench_transfers;
mod checks;
mod complete;
mod convert;
mod docs;
mod generate;
mod job;
mod model_arg;
mod peers;
mod pipeline;
#[cfg(feature = "mpi")]
mod pipeline_mpi;
mod plot;
mod policy;
pub mod policy_args;
mod policy_plot;
mod process;
mod profile;
mod sampling_args;
mod serve;
mod specs;
mod sweep;

/// The version of every `--json` document's layout (docs/json.md); raised when a field changes meaning or goes.
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// The `--help` headings that group the flags every command shares.
pub mod headings {
    /// Which model and weights, and how they are stored.
    pub const MODEL: &str = "Model";
    /// The prompts and how much to generate.
    pub const PROMPTS: &str = "Prompts";
    /// How tokens are chosen.
    pub const SAMPLING: &str = "Sampling";
    /// Batching and placement.
    pub const POLICY: &str = "Policy";
    /// How much memory and disk each tier may use.
    pub const MEMORY_CAPS: &str = "Memory caps";
    /// Quantised weights and cache.
    pub const COMPRESSION: &str = "Compression";
    /// What is printed or written.
    pub const OUTPUT: &str = "Output";
}

/// High-throughput OPT inference on one GPU, offloading to CPU memory and disk.
#[derive(Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in model specs, or one model's sizes for a workload.
    Specs(specs::Args),
    /// Generate text (or token ids) from prompts.
    Generate(generate::Args),
    /// Run FlexLLMGen's benchmark workload and report latency, throughput and memory (`bench kernels`: time each
    /// kernel).
    Bench(bench::Command),
    /// Measure this machine's transfer and compute speeds for the cost model.
    Profile(profile::Args),
    /// Choose the fastest offloading policy for a model, workload and memory budget.
    Policy(policy::Args),
    /// Convert PyTorch weights (pytorch_model*.bin) to safetensors.
    Convert(convert::Args),
    /// Serve the model over HTTP, OpenAI-compatible (/v1/completions, /v1/models, /health, /metrics).
    Serve(serve::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(hide = true)]
    Completions(docs::CompletionsArgs),
    /// Write the man pages: `strata.1` to stdout, or every command's page into DIR.
    #[command(hide = true)]
    Man(docs::ManArgs),
}

impl Command {
    /// Whether the command may open a GPU (and so load a Vulkan driver).
    fn opens_gpu(&self) -> bool {
        matches!(
            self,
            Command::Generate(_) | Command::Bench(_) | Command::Profile(_) | Command::Serve(_)
        )
    }
}

/// The command line as clap sees it. Every option value may start with `-`, so `--max-new-tokens -10` is reported as
/// the value `-10` the user typed (not as an unknown flag `-1`).
fn command() -> clap::Command {
    Cli::command()
        .mut_subcommands(|sub| {
            sub.mut_args(|arg| {
                if arg.get_action().takes_values() {
                    arg.allow_negative_numbers(true)
                } else {
                    arg
                }
            })
        })
        // The caps are shared with bench and generate, where --gpu-mem is optional; policy needs it to search.
        .mut_subcommand("policy", |sub| {
            sub.mut_arg("gpu_mem", |arg| {
                arg.help("Most GPU memory to use (e.g. 15GiB); required unless --evaluate")
            })
        })
}

/// Parses the command line.
fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn main() -> ExitCode {
    let cli = parse();
    // Before any thread starts or any GPU instance exists: it sets an environment variable Mesa reads.
    if cli.command.opens_gpu() {
        process::private_runtime_dir();
    }
    // The server drains on a signal (its own handler); every other command stops at once, removing its files.
    let signals = if matches!(cli.command, Command::Serve(_)) {
        Ok(())
    } else {
        process::handle_signals()
    };
    if let Err(e) = signals {
        anstream::eprintln!(
            "warning: no signal handler ({e}): offload files may be left behind if interrupted"
        );
    }
    let backend_ok = if cli.command.opens_gpu() {
        checks::wgpu_backend(std::env::var("WGPU_BACKEND").ok().as_deref())
    } else {
        Ok(())
    };
    let result = backend_ok.and_then(|()| match cli.command {
        Command::Specs(args) => specs::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(command) => bench::dispatch(command),
        Command::Profile(args) => profile::run(args),
        Command::Policy(args) => policy::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Completions(args) => docs::completions(args, command()),
        Command::Man(args) => docs::man(args, command()),
    });
    // Every run's files are gone with its values by now; this removes the private runtime directory.
    process::remove_run_files();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => ExitCode::from(process::report_error(&err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks: no two flags of a command share a name or short flag (flattened groups
    /// included), and every `requires` / `conflicts_with` names a flag that exists.
    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }
}
