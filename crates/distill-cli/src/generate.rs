//! `distill generate MODEL --prompt TEXT`: greedy decoding with the KV cache, streamed to
//! stdout. A quick way to see that a model loads and talks; `distill eval` does the scoring.

use std::io::Write;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{Int, Tensor, TensorData};
use distill_hf::hub::{self, HubSettings};
use distill_hf::template::Message;
use distill_hf::tokenizer::TextTokenizer;
use distill_models::{CausalLm, Kernels};

use crate::backend::{DeviceArg, Job, run_on};

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, or `org/name[@revision]` from the Hub.
    model: String,
    /// The text to continue; with --chat, the user's message.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
}

pub fn run(args: Args, device: Option<DeviceArg>) -> anyhow::Result<()> {
    let dir = hub::resolve(&args.model, &HubSettings::from_env())?;
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    let prompt = if args.chat {
        tokenizer.encode_chat(&[Message::new("user", args.prompt.clone())], true)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let job = Greedy {
        dir,
        tokenizer,
        prompt,
        max_new_tokens: args.max_new_tokens,
    };
    run_on(DeviceArg::resolve(device), job)
}

struct Greedy {
    dir: std::path::PathBuf,
    tokenizer: TextTokenizer,
    prompt: Vec<u32>,
    max_new_tokens: usize,
}

impl Job for Greedy {
    type Output = ();

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<()>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        let model = CausalLm::<B>::load(&self.dir, &device)
            .with_context(|| format!("loading {}", self.dir.display()))?;
        let stop: Vec<u32> = model
            .config
            .eos_token_ids
            .iter()
            .copied()
            .chain(
                self.tokenizer
                    .specials
                    .eos
                    .as_deref()
                    .and_then(|t| self.tokenizer.token_to_id(t)),
            )
            .collect();
        let mut cache = model.new_cache();
        let mut input = self.prompt.clone();
        let mut generated: Vec<u32> = Vec::new();
        let mut printed = 0;
        let mut out = std::io::stdout().lock();
        for _ in 0..self.max_new_tokens {
            let ids: Vec<i64> = input.iter().map(|&t| i64::from(t)).collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, input.len()]), &device);
            let logits = model.forward_cached(ids, &mut cache); // [1, T, V]
            let t = logits.dims()[1];
            let next = logits.narrow(1, t - 1, 1).argmax(2).into_scalar();
            let next = u32::try_from(burn::tensor::ElementConversion::elem::<i64>(next))?;
            if stop.contains(&next) {
                break;
            }
            generated.push(next);
            // Decode the whole continuation each time so multi-byte characters print whole.
            let text = self.tokenizer.decode(&generated, true)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                write!(out, "{}", &text[printed..])?;
                out.flush()?;
                printed = text.len();
            }
            input = vec![next];
        }
        writeln!(out)?;
        Ok(())
    }
}
