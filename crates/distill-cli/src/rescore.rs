//! `distill gen-data --recipe R --rescore`: a teacher re-scores the dataset's samples
//! teacher-forced and writes its top-k log-probabilities as soft labels (`<dataset>/soft/`):
//! a local teacher in burn (`[soft_labels] source = "local-rescore"`, the default for
//! --rescore), or a vLLM server asked for `prompt_logprobs` over the token ids
//! (`source = "vllm-prompt-logprobs"`, the [teacher] endpoint).

use std::time::Duration;

use anyhow::Context;
use distill_core::recipe::SoftLabelSource;
use distill_data::examples::{DataOptions, Example, IGNORE, load_held_out};
use distill_data::soft::{PAD_ID, SoftMeta, SoftRecord, SoftWriter, soft_dir};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_teacher::prompt_logprobs::{PromptLogprobs, prompt_logprobs};

use burn::backend::Autodiff;
use burn::tensor::backend::BackendTypes;
use distill_core::Recipe;
use distill_models::Kernels;
use distill_teacher::rescore::{RescoreSpec, RescoreSummary, rescore};

use crate::backend::{DeviceArg, Job, run_on};
use crate::progress::StageBars;

pub fn run(recipe: &Recipe, teacher: Option<String>, device: Option<DeviceArg>) -> anyhow::Result<()> {
    if recipe.soft_labels.source == SoftLabelSource::VllmPromptLogprobs {
        anyhow::ensure!(
            teacher.is_none(),
            "--teacher names a local model; with [soft_labels] source = \"vllm-prompt-logprobs\" the teacher is the [teacher] server"
        );
        return run_remote(recipe);
    }
    let Some(teacher) = teacher.or_else(|| recipe.teacher.local_model.clone()) else {
        anyhow::bail!(
            "re-scoring needs a local teacher: set [teacher] local_model in the recipe or pass --teacher MODEL \
             (a model sharing the student's vocabulary)"
        );
    };
    let spec = RescoreSpec {
        dataset: recipe.data.dataset.clone(),
        teacher,
        student: Some(recipe.student.model.clone()),
        k: recipe.soft_labels.k,
        dtype: recipe.soft_labels.dtype,
        seq_len: recipe.train.seq_len,
        // A few sequences per forward: enough to fill a GPU at fixture and 7B sizes alike
        // without holding more than a [chunk x vocab] block of logits.
        batch_tokens: 4 * recipe.train.seq_len,
    };
    let summary = run_on(DeviceArg::resolve(device), RescoreJob { spec: spec.clone() })?;
    let c = summary.store.counts;
    println!(
        "re-scored {} samples with {} ({} were already scored): {} samples, {} tokens, top-{} at {:.1} bytes/token in {}",
        summary.scored,
        spec.teacher,
        summary.already_present,
        c.samples,
        c.tokens,
        spec.k,
        summary.store.bytes_per_token,
        distill_data::soft::soft_dir(&spec.dataset).display()
    );
    Ok(())
}

struct RescoreJob {
    spec: RescoreSpec,
}

impl Job for RescoreJob {
    type Output = RescoreSummary;

    fn run<B: Kernels>(self, device: B::Device) -> anyhow::Result<RescoreSummary>
    where
        Autodiff<B>: Kernels + BackendTypes<Device = B::Device>,
    {
        Ok(rescore::<B>(&self.spec, &device, &StageBars::default())?)
    }
}

/// Re-scoring through a vLLM server: each sample's token ids (rendered with the student's
/// template, as training renders them) go to `/v1/completions` with `prompt_logprobs: k`,
/// a few requests in flight at once ([gen] concurrency).
fn run_remote(recipe: &Recipe) -> anyhow::Result<()> {
    let s = &recipe.soft_labels;
    let tokenizer_ref = s
        .tokenizer
        .clone()
        .unwrap_or_else(|| recipe.student.model.clone());
    let tokenizer = TextTokenizer::from_dir(&hub::resolve(&tokenizer_ref, &HubSettings::from_env())?)?;
    let opts = DataOptions {
        seq_len: recipe.train.seq_len,
        held_out: 1.0,
        keep_truncated: true,
        keep_only_correct: false,
    };
    let examples = load_held_out(&recipe.data.dataset, &tokenizer, &opts)?;
    let meta = SoftMeta {
        source: SoftLabelSource::VllmPromptLogprobs,
        k: s.k,
        temperature: 1.0,
        dtype: s.dtype,
        tokenizer_hash: tokenizer.hash.clone(),
        tokenizer: tokenizer_ref,
        vocab_size: tokenizer.vocab_size(),
    };
    let dir = soft_dir(&recipe.data.dataset);
    let mut writer = SoftWriter::create_or_resume(&dir, meta)?;
    let todo: Vec<&Example> = examples.iter().filter(|e| !writer.contains(&e.key)).collect();
    let key = distill_teacher::fleet::key_from_env(
        &recipe.teacher.base_url,
        recipe.teacher.api_key_env.as_deref(),
    )?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(recipe.generation.request_timeout_s))
        .build()
        .context("building the HTTP client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar = indicatif::ProgressBar::new(todo.len() as u64).with_message("re-scoring (vLLM)");
    for chunk in todo.chunks(recipe.generation.concurrency.max(1)) {
        let replies = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, ex) in chunk.iter().enumerate() {
                let (client, key) = (client.clone(), key.clone());
                let (url, model, ids, k) = (
                    recipe.teacher.base_url.clone(),
                    recipe.teacher.model.clone(),
                    ex.input_ids.clone(),
                    s.k,
                );
                set.spawn(async move {
                    (
                        i,
                        prompt_logprobs(&client, &url, key.as_ref(), &model, &ids, k).await,
                    )
                });
            }
            let mut out: Vec<Option<_>> = (0..chunk.len()).map(|_| None).collect();
            while let Some(joined) = set.join_next().await {
                let (i, reply) = joined.expect("a re-scoring request task panicked");
                out[i] = Some(reply);
            }
            out.into_iter().map(|r| r.expect("every request answered"))
        });
        for (ex, reply) in chunk.iter().zip(replies) {
            let per_position = reply.with_context(|| format!("re-scoring sample {}", ex.key))?;
            writer.append(&ex.key, &record_from_prompt_logprobs(ex, &per_position, s.k)?)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let summary = writer.finish()?;
    println!(
        "re-scored {} samples with {} at {} ({} were already scored): {} samples, {} tokens, top-{} at {:.1} bytes/token in {}",
        todo.len(),
        recipe.teacher.model,
        recipe.teacher.base_url,
        examples.len() - todo.len(),
        summary.counts.samples,
        summary.counts.tokens,
        s.k,
        summary.bytes_per_token,
        dir.display()
    );
    Ok(())
}

/// A record over the example's label positions from per-position prompt logprobs, where
/// entry i predicts token i (so label position p, predicting token p + 1, reads entry p + 1).
fn record_from_prompt_logprobs(
    ex: &Example,
    per_position: &PromptLogprobs,
    k: usize,
) -> anyhow::Result<SoftRecord> {
    let (mut ids, mut top_ids, mut top_lps) = (Vec::new(), Vec::new(), Vec::new());
    for (p, &label) in ex.labels.iter().enumerate().filter(|(_, l)| **l != IGNORE) {
        ids.push(label as u32);
        let mut alts: Vec<(u32, f32)> = per_position.get(p + 1).cloned().flatten().unwrap_or_default();
        alts.sort_by(|a, b| b.1.total_cmp(&a.1));
        alts.truncate(k);
        for j in 0..k {
            let (id, lp) = alts.get(j).copied().unwrap_or((PAD_ID, f32::NEG_INFINITY));
            top_ids.push(id);
            top_lps.push(lp);
        }
    }
    SoftRecord::new(ids, k, top_ids, top_lps).map_err(|msg| anyhow::anyhow!("sample {}: {msg}", ex.key))
}
