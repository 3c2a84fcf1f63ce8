//! `distill generate MODEL --prompt TEXT`: greedy decoding by the shared generation engine,
//! streamed to stdout. A quick way to see that a model loads and talks; `distill eval` does
//! the scoring.

use std::io::Write;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_hf::hub::{self, HubSettings};
use distill_hf::template::Message;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{Decoding, Event, GenerationConfig, Request, Sampling, generate_with};
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
            .with_context(|| format!("loading {}", self.dir.display()))?
            .into_decoding();
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
        let request = Request {
            prompt: self.prompt.clone(),
            seed: 0,
        };
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: self.max_new_tokens,
                sampling: Sampling::GREEDY,
                stop: Vec::new(),
                eos: stop,
                logprobs: None,
            },
            batch_size: 1,
            kv_cache_tokens: None,
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut printed = 0;
        let mut out = std::io::stdout().lock();
        let mut failed: Option<anyhow::Error> = None;
        // The shared engine (KV cache, the fused decoding step on CUDA), one token at a time.
        generate_with(&model, &self.tokenizer, &[request], &cfg, &device, |event| {
            let Event::Token { token, .. } = event else {
                return true;
            };
            generated.push(token);
            // Decode the whole continuation each time so multi-byte characters print whole.
            let shown = self
                .tokenizer
                .decode(&generated, true)
                .map_err(anyhow::Error::from)
                .and_then(|text| {
                    if text.len() > printed && text.is_char_boundary(printed) {
                        write!(out, "{}", &text[printed..])?;
                        out.flush()?;
                        printed = text.len();
                    }
                    Ok(())
                });
            shown.map_err(|e| failed = Some(e)).is_ok()
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        writeln!(out)?;
        Ok(())
    }
}
