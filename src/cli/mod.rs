//! Argument parsing and dispatch; each subcommand lives in its own module with its `Args` and `run`.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod auto;
mod bench;
mod generate;
mod policy;
pub mod policy_args;
mod profile;
mod specs;

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
    /// Run FlexLLMGen's benchmark workload and report latency, throughput and memory.
    Bench(bench::Args),
    /// Measure this machine's transfer and compute speeds for the cost model.
    Profile(profile::Args),
    /// Choose the fastest offloading policy for a model, workload and memory budget.
    Policy(policy::Args),
}

/// Ends the process at once. `std::process::exit` runs the C atexit handlers first (the Vulkan driver's teardown can
/// take a while), during which the main thread keeps running and may write new offload files after the cleanup; so a
/// second cleanup runs right before `_exit`, which skips them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    {
        unsafe extern "C" {
            fn _exit(status: i32) -> !;
        }
        strata::tiers::cleanup_all();
        // SAFETY: _exit takes any status and never returns; no Rust state is used afterwards.
        unsafe { _exit(code) }
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C: remove every offload file and directory this process made, then exit as a shell expects.
    if let Err(e) = ctrlc::set_handler(|| {
        strata::tiers::cleanup_all();
        exit_now(130);
    }) {
        eprintln!(
            "warning: no Ctrl-C handler ({e}): offload files may be left behind if interrupted"
        );
    }
    let result = match cli.command {
        Command::Specs(args) => specs::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Policy(args) => policy::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
