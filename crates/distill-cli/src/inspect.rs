//! `distill inspect MODEL`: what a model directory holds, read from its headers only, with
//! every tensor name and shape checked against config.json. `distill inspect DATASET_DIR`: a
//! gen-data dataset's counts and its soft labels, validated (see [`dataset`]).

mod dataset;

use std::path::PathBuf;

use anyhow::Context;
use distill_hf::config::RopeScaling;
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_hf::weights::Checkpoint;
use distill_models::DecoderConfig;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, `org/name[@revision]` from the Hub, or a dataset
    /// directory (samples-*.jsonl, soft/) that gen-data wrote.
    model: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// For a dataset: the student model whose tokenizer the soft labels must match (its
    /// tokenizer hash and vocabulary size are checked).
    #[arg(long, value_name = "MODEL")]
    student: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if dataset::is_dataset(&args.model) {
        return dataset::run(
            std::path::Path::new(&args.model),
            args.student.as_deref(),
            args.json,
        );
    }
    let dir = hub::resolve(&args.model, &HubSettings::from_env())?;
    let report = Report::read(&dir).with_context(|| format!("inspecting {}", args.model))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

struct Report {
    dir: PathBuf,
    config: DecoderConfig,
    dtypes: Vec<(String, usize)>,
    stored_params: usize,
    tokenizer: TextTokenizer,
    files: Vec<PathBuf>,
}

impl Report {
    fn read(dir: &std::path::Path) -> anyhow::Result<Self> {
        let config = DecoderConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        ckpt.check(&config.expected_tensors(), config.architecture.hf_name())?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let stored_params = ckpt
            .tensors()
            .values()
            .map(|m| m.shape.iter().product::<usize>())
            .sum();
        let mut files = vec![dir.join("config.json")];
        let index = dir.join(distill_hf::weights::INDEX_FILE);
        if index.exists() {
            files.push(index);
        }
        files.extend(ckpt.files().map(|p| p.to_path_buf()));
        files.extend(tokenizer.files.iter().cloned());
        Ok(Report {
            dir: dir.to_path_buf(),
            dtypes: ckpt.dtype_counts().into_iter().collect(),
            config,
            stored_params,
            tokenizer,
            files,
        })
    }

    fn special(&self, token: &Option<String>) -> String {
        match token {
            Some(t) => match self.tokenizer.token_to_id(t) {
                Some(id) => format!("{t} ({id})"),
                None => format!("{t} (not in vocabulary)"),
            },
            None => "none".into(),
        }
    }

    fn template_source(&self) -> Option<String> {
        self.tokenizer.chat_template.as_ref().map(|t| {
            t.source
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
    }

    fn rope(&self) -> String {
        let scaling = match &self.config.rope_scaling {
            RopeScaling::None => "none".to_string(),
            RopeScaling::Linear { factor } => format!("linear x{factor}"),
            RopeScaling::Llama3 {
                factor,
                original_max_position_embeddings,
                ..
            } => {
                format!("llama3 x{factor} from {original_max_position_embeddings}")
            }
        };
        format!("theta {}, scaling {scaling}", self.config.rope_theta)
    }

    fn to_text(&self) -> String {
        let c = &self.config;
        let dtypes: Vec<String> = self.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
        let specials = &self.tokenizer.specials;
        let rows = [
            ("model", self.dir.display().to_string()),
            ("architecture", c.architecture.hf_name().to_string()),
            (
                "parameters",
                format!("{} ({})", human(self.stored_params), self.stored_params),
            ),
            (
                "dtype",
                format!(
                    "{} (config: {})",
                    dtypes.join(", "),
                    c.torch_dtype.as_deref().unwrap_or("unset")
                ),
            ),
            (
                "vocab size",
                format!("{} (tokenizer: {})", c.vocab_size, self.tokenizer.vocab_size()),
            ),
            ("context length", format!("{} tokens", c.max_position_embeddings)),
            (
                "shape",
                format!(
                    "{} layers, hidden {}, intermediate {}, {} heads ({} kv), head_dim {}",
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim
                ),
            ),
            ("rope", self.rope()),
            (
                "embeddings",
                if c.tie_word_embeddings {
                    "tied to lm_head"
                } else {
                    "untied"
                }
                .into(),
            ),
            (
                "special tokens",
                format!(
                    "bos {}, eos {}, pad {}; {} added special tokens",
                    self.special(&specials.bos),
                    self.special(&specials.eos),
                    self.special(&specials.pad),
                    self.tokenizer.added_special_tokens().len()
                ),
            ),
            (
                "chat template",
                match self.template_source() {
                    Some(src) => format!("yes ({src})"),
                    None => "no".into(),
                },
            ),
            ("tokenizer sha256", self.tokenizer.hash.clone()),
        ];
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<17}{v}\n"));
        }
        out.push_str("files read\n");
        for f in &self.files {
            out.push_str(&format!("  {}\n", f.display()));
        }
        out
    }

    fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        let s = &self.tokenizer.specials;
        json!({
            "model": self.dir,
            "architecture": c.architecture.hf_name(),
            "parameters": self.stored_params,
            "dtypes": self.dtypes.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "torch_dtype": c.torch_dtype,
            "vocab_size": c.vocab_size,
            "tokenizer_vocab_size": self.tokenizer.vocab_size(),
            "context_length": c.max_position_embeddings,
            "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "tie_word_embeddings": c.tie_word_embeddings,
            "special_tokens": {"bos": s.bos, "eos": s.eos, "pad": s.pad, "unk": s.unk},
            "chat_template": self.template_source(),
            "tokenizer_sha256": self.tokenizer.hash,
            "files": self.files,
        })
    }
}

/// 494032768 -> "494.0M".
pub(crate) fn human(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}
