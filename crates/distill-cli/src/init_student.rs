//! `distill init-student --from MODEL --out DIR`: a student initialised from a teacher by
//! keeping some of its decoder blocks (see distill_models::init_student).

use std::path::PathBuf;

use distill_hf::hub::{self, HubSettings};
use distill_models::init_student::{InitStudentError, InitSummary, LayerSelection, init_student};

use crate::inspect::human;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("selection").required(true).args(["layers", "keep_every"])))]
pub struct Args {
    /// The model to take layers from: a Hugging Face model directory or `org/name[@revision]`.
    #[arg(long, value_name = "MODEL")]
    from: String,
    /// The student directory to write (config.json, model.safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Source layers to keep, 0-based and strictly increasing, e.g. `0,2,5,11`.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Keep layers 0, N, 2N, ... (DistilBERT keeps every other layer: N = 2).
    #[arg(long, value_name = "N")]
    keep_every: Option<usize>,
    /// With --keep-every, also keep the last layer.
    #[arg(long, requires = "keep_every")]
    keep_last: bool,
    /// Replace --out if it exists and is not empty.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (selection, flag) = match (args.layers, args.keep_every) {
        (Some(layers), _) => (LayerSelection::List(layers), "--layers"),
        (None, Some(step)) => (
            LayerSelection::Every {
                step,
                keep_last: args.keep_last,
            },
            "--keep-every",
        ),
        (None, None) => unreachable!("clap requires --layers or --keep-every"),
    };
    let source = hub::resolve(&args.from, &HubSettings::from_env())?;
    let summary = init_student(&source, &args.out, &selection, args.force).map_err(|e| name_flag(e, flag))?;
    print!("{}", report(&args.from, &args.out, &summary));
    Ok(())
}

/// A selection that does not fit the model is the flag's fault, so the error names it.
fn name_flag(e: InitStudentError, flag: &str) -> anyhow::Error {
    match e {
        InitStudentError::Selection(msg) => anyhow::anyhow!("{flag}: {msg}"),
        other => other.into(),
    }
}

fn report(from: &str, out: &std::path::Path, s: &InitSummary) -> String {
    let kept: Vec<String> = s.kept.iter().map(usize::to_string).collect();
    let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
    let share = 100.0 * s.params_after as f64 / s.params_before as f64;
    format!(
        "kept layers  {} of {} from {from} (student layers 0-{})\n\
         parameters   {} ({}) -> {} ({}), {share:.1}%\n\
         dtype        {} (copied as stored)\n\
         wrote        {}: {}\n",
        kept.join(","),
        s.source_layers,
        s.kept.len() - 1,
        human(s.params_before),
        s.params_before,
        human(s.params_after),
        s.params_after,
        dtypes.join(", "),
        out.display(),
        s.files.join(", "),
    )
}
