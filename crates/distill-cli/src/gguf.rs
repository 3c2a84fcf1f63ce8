//! `distill import gguf` and `distill export gguf`: the Ollama / llama.cpp round trip.
//! The conversion lives in distill-gguf; this module parses arguments, keeps outputs atomic
//! and prints what to run next.

use std::path::PathBuf;

use anyhow::Context;
use distill_gguf::export::{Quant, export_gguf};
use distill_gguf::import::{OutDtype, import_gguf};
use distill_gguf::{output, resolve_source};
use distill_hf::hub::{self, HubSettings};

#[derive(clap::Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    format: ImportFormat,
}

#[derive(clap::Subcommand)]
enum ImportFormat {
    /// A GGUF file (llama.cpp, Ollama) to a Hugging Face model directory that every distill
    /// command reads: config.json, model.safetensors, tokenizer.json, chat template.
    Gguf(ImportGguf),
}

#[derive(clap::Args)]
struct ImportGguf {
    /// A .gguf file, or `ollama:NAME[:TAG]` from Ollama's store ($OLLAMA_MODELS or
    /// ~/.ollama/models), e.g. `ollama:deepseek-r1:1.5b`.
    source: String,
    /// The model directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype: bf16 (half the size) or f32 (every dequantized value exactly).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// Replace --out if it exists and is not empty.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    format: ExportFormat,
}

#[derive(clap::Subcommand)]
enum ExportFormat {
    /// A model directory to one GGUF file for llama.cpp and Ollama, with tokenizer and chat
    /// template; prints the Modelfile and the `ollama create` command.
    Gguf(ExportGguf),
}

#[derive(clap::Args)]
struct ExportGguf {
    /// A Hugging Face model directory (e.g. a `distill train` run's final/) or `org/name[@rev]`.
    #[arg(long)]
    model: String,
    /// The .gguf file to write.
    #[arg(long)]
    out: PathBuf,
    /// Tensor types, as llama-quantize names them: f16, q8_0, q4_0, q4_k_m, or f32.
    #[arg(long, default_value = "q8_0", value_parser = ["f32", "f16", "q8_0", "q4_0", "q4_k_m"])]
    quant: String,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn import(args: ImportArgs) -> anyhow::Result<()> {
    let ImportFormat::Gguf(args) = args.format;
    let source = resolve_source(&args.source)?;
    let dtype = if args.dtype == "f32" {
        OutDtype::F32
    } else {
        OutDtype::Bf16
    };
    let summary = output::write_dir(&args.out, args.force, |dir| import_gguf(&source, dir, dtype))
        .with_context(|| format!("importing {}", args.source))?;
    let types: Vec<String> = summary
        .source_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "imported {} ({}, {} tensors from {}; {:.1}M parameters) into {} as {}",
        summary.name.as_deref().unwrap_or("model"),
        summary.arch.hf_class(),
        summary.tensors,
        types.join(", "),
        summary.parameters as f64 / 1e6,
        args.out.display(),
        args.dtype,
    );
    let chat = if summary.has_chat_template { " --chat" } else { "" };
    println!(
        "try: distill generate {}{chat} --prompt \"What is 17 * 23?\"",
        args.out.display()
    );
    Ok(())
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let ExportFormat::Gguf(args) = args.format;
    let dir = hub::resolve(&args.model, &HubSettings::from_env())?;
    let quant = Quant::parse(&args.quant).expect("clap checked the value");
    let summary = output::write_file(&args.out, args.force, |tmp| export_gguf(&dir, tmp, quant))
        .with_context(|| format!("exporting {}", args.model))?;
    let types: Vec<String> = summary.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {} tensors: {}; {:.1} MB)",
        args.out.display(),
        summary.arch.hf_class(),
        summary.tensors,
        types.join(", "),
        size as f64 / 1e6
    );
    let gguf = std::path::absolute(&args.out).unwrap_or(args.out.clone());
    let name = args
        .out
        .file_stem()
        .map_or("student".into(), |s| s.to_string_lossy().to_lowercase());
    println!("\n# Modelfile (Ollama reads the chat template from the GGUF's tokenizer.chat_template)");
    println!("FROM {}", gguf.display());
    for stop in &summary.stop_tokens {
        println!("PARAMETER stop {stop:?}");
    }
    println!("\n# save the lines above as Modelfile, then:");
    println!("ollama create {name} -f Modelfile && ollama run {name}");
    Ok(())
}
