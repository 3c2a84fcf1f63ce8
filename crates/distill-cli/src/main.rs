//! `distill`: distil DeepSeek-R1 into a small Qwen or Llama student on one GPU.

mod backend;
mod bench;
mod eval;
mod gen_data;
mod generate;
mod gguf;
mod init_student;
mod inspect;
mod progress;
mod rescore;
mod serve;
mod train;

use std::process::ExitCode;

/// Counts what a chat template's render holds, so that a hostile template is stopped at its
/// memory budget (distill_hf::guard) instead of taking the machine down.
#[global_allocator]
static ALLOCATOR: distill_hf::guard::GuardedAllocator = distill_hf::guard::GuardedAllocator;

use clap::{Parser, Subcommand};

use backend::DeviceArg;

/// Distil a large reasoning teacher (DeepSeek-R1 and its kin) into a small Qwen or Llama
/// student on one GPU you own.
#[derive(Parser)]
#[command(name = "distill", version, about, long_about = None)]
struct Cli {
    /// Where tensors live: `cpu`, `cuda` or `cuda:N`. Default: CUDA when this build has it
    /// and a GPU is present, else CPU.
    #[arg(long, global = true, value_name = "DEVICE")]
    device: Option<DeviceArg>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Query a teacher to build prompt/response and soft-label datasets.
    GenData(gen_data::Args),
    /// Fine-tune a student with KL (soft labels) + cross-entropy (hard labels).
    Train(train::Args),
    /// Score students, their base model and the teacher on held-out sets.
    Eval(Box<eval::Args>),
    /// Describe a model directory or Hub model: architecture, size, tokenizer, template.
    Inspect(inspect::Args),
    /// Continue a prompt with greedy decoding (a quick check that a model loads and talks).
    Generate(generate::Args),
    /// Serve a local model over an OpenAI-compatible HTTP API (chat, completions, logprobs).
    Serve(serve::Args),
    /// Make a student from a larger model by keeping some of its layers (`--keep-every 2`).
    InitStudent(init_student::Args),
    /// Convert a model from another format: `distill import gguf FILE|ollama:NAME --out DIR`.
    Import(gguf::ImportArgs),
    /// Convert a model to another format: `distill export gguf --model DIR --out FILE`.
    Export(gguf::ExportArgs),
    /// Benchmark GEMMs, the loss, training steps, memory and generation on random-init
    /// models of real shapes (`--config DIR`); see docs/PERFORMANCE.md.
    Bench(Box<bench::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::GenData(args) => gen_data::run(args, cli.device),
        Command::Train(args) => train::run(args, cli.device),
        Command::Eval(args) => eval::run(*args, cli.device),
        Command::Inspect(args) => inspect::run(args),
        Command::Generate(args) => generate::run(args, cli.device),
        Command::Serve(args) => serve::run(args, cli.device),
        Command::InitStudent(args) => init_student::run(args),
        Command::Import(args) => gguf::import(args),
        Command::Export(args) => gguf::export(args),
        Command::Bench(args) => bench::run(*args, cli.device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`distill inspect M | head -1`) panics
/// with "failed printing to stdout". Commands that print for pipes take the default action
/// instead and end quietly, as other command-line tools do. Sockets are unaffected (Linux
/// sends with MSG_NOSIGNAL); `serve` keeps Rust's setting all the same.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: sets a signal disposition to a libc-provided constant before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
