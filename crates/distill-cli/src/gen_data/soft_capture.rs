//! gen-data's soft labels with `[soft_labels] source = "api-top-logprobs"`: every request asks
//! for `logprobs` and the top k alternatives; each response's tokens are mapped to the ids of
//! the student tokenizer (`[soft_labels] tokenizer`, default `[student] model`) and written to
//! `<dataset>/soft/` before its sample is recorded, so a sample always has its soft labels.
//! Once the teacher's tokens stop carrying over (`max_mismatch_rate`, judged after
//! [`MIN_TOKENS_TO_JUDGE`] tokens), the run stops with one line saying so.

use std::path::Path;

use anyhow::{Context, bail};
use distill_core::recipe::SoftLabelSource;
use distill_core::{Recipe, TokenLogprob};
use distill_data::Sample;
use distill_data::soft::{SoftMeta, SoftRecord, SoftSummary, SoftWriter, soft_dir};
use distill_hf::hub::{self, HubSettings};
use distill_hf::token_map::{MappingStats, TokenMap, map_sample};
use distill_hf::tokenizer::TextTokenizer;
use distill_teacher::TeacherError;
use distill_teacher::ledger::Ledger;
use distill_teacher::manifest::SoftLabelsInfo;
use distill_teacher::plan::Job;
use distill_teacher::run::SampleHook;

/// Teacher tokens seen before the mismatch rate is judged: a few hundred tokens of one short
/// answer say little; a thousand are one or two real responses.
pub const MIN_TOKENS_TO_JUDGE: u64 = 1000;

/// Refuses the soft-label sources gen-data does not write itself.
pub fn check_source(recipe: &Recipe) -> anyhow::Result<()> {
    let s = &recipe.soft_labels;
    if !s.enabled {
        return Ok(());
    }
    match s.source {
        SoftLabelSource::ApiTopLogprobs => Ok(()),
        SoftLabelSource::LocalRescore => bail!(
            "{}: [soft_labels] source = \"local-rescore\" is written after generation by `distill gen-data --recipe {} --rescore` (a local teacher re-scores the samples); generate with soft_labels.enabled = false first",
            recipe.source.display(),
            recipe.source.display()
        ),
        SoftLabelSource::VllmPromptLogprobs => bail!(
            "{}: [soft_labels] source = \"vllm-prompt-logprobs\" re-scores existing samples: run `distill gen-data --recipe {} --rescore` (the [teacher] server is asked for prompt_logprobs); generate with soft_labels.enabled = false first",
            recipe.source.display(),
            recipe.source.display()
        ),
    }
}

pub struct SoftCapture {
    tokenizer: TextTokenizer,
    map: TokenMap,
    writer: SoftWriter,
    k: usize,
    max_mismatch_rate: f64,
    /// Over this run's samples.
    stats: MappingStats,
    teacher: String,
    tokenizer_ref: String,
}

impl SoftCapture {
    /// The capture for `recipe`, or None when its soft labels are off.
    pub fn open(recipe: &Recipe) -> anyhow::Result<Option<SoftCapture>> {
        let s = &recipe.soft_labels;
        if !s.enabled {
            return Ok(None);
        }
        let tokenizer_ref = s
            .tokenizer
            .clone()
            .unwrap_or_else(|| recipe.student.model.clone());
        let dir = hub::resolve(&tokenizer_ref, &HubSettings::from_env()).with_context(|| {
            format!("[soft_labels] tokenizer (default: [student] model) `{tokenizer_ref}`")
        })?;
        let tokenizer = TextTokenizer::from_dir(&dir)?;
        let map = TokenMap::new(&tokenizer)?;
        let meta = SoftMeta {
            source: s.source,
            k: s.k,
            temperature: recipe.generation.temperature,
            dtype: s.dtype,
            tokenizer_hash: tokenizer.hash.clone(),
            tokenizer: tokenizer_ref.clone(),
            vocab_size: tokenizer.vocab_size(),
        };
        let writer = SoftWriter::create_or_resume(&soft_dir(&recipe.data.dataset), meta)?;
        let r = writer.recovery();
        if r.torn_bytes > 0 {
            println!(
                "gen-data: cut a torn soft-label record ({} bytes, a write cut off by a crash) off {}",
                r.torn_bytes,
                soft_dir(&recipe.data.dataset).join("staging.bin").display()
            );
        }
        Ok(Some(SoftCapture {
            tokenizer,
            map,
            writer,
            k: s.k,
            max_mismatch_rate: s.max_mismatch_rate,
            stats: MappingStats::default(),
            teacher: recipe.teacher.model.clone(),
            tokenizer_ref,
        }))
    }

    /// Refuses a dataset whose samples were generated without soft labels: they would be
    /// skipped as done and never get any.
    pub fn check_ledger(&self, dir: &Path, jobs: &[Job], ledger: &Ledger) -> anyhow::Result<()> {
        let missing = jobs
            .iter()
            .filter(|j| ledger.is_done(&j.key) && !self.writer.contains(&j.key))
            .count();
        if missing > 0 {
            bail!(
                "{}: {missing} samples have no soft labels (generated before [soft_labels] was enabled); gen-data only adds soft labels to new samples. HINT: use another data.dataset, or re-score these samples locally (`distill gen-data --rescore`)",
                dir.display()
            );
        }
        Ok(())
    }

    /// For the dataset manifest: the store as it stands, and this run's mismatch rate.
    pub fn info(&self, summary: Option<&SoftSummary>) -> SoftLabelsInfo {
        let m = self.writer.manifest();
        let (counts, bpt) = match summary {
            Some(s) => (s.counts, s.bytes_per_token),
            None => (m.counts, m.bytes_per_token),
        };
        SoftLabelsInfo {
            dir: distill_data::soft::DIR.into(),
            source: m.source.as_str().into(),
            k: m.k,
            tokenizer: m.tokenizer.clone(),
            tokenizer_hash: m.tokenizer_hash.clone(),
            samples: counts.samples,
            tokens: counts.tokens,
            bytes_per_token: bpt,
            mismatch_rate: (self.stats.tokens > 0).then(|| self.stats.mismatch_rate()),
        }
    }

    pub fn stats(&self) -> &MappingStats {
        &self.stats
    }

    /// Compacts what is staged; returns the store's summary and its manifest entry.
    pub fn finish(self) -> anyhow::Result<(SoftSummary, SoftLabelsInfo)> {
        let info_base = SoftCapture::info(&self, None);
        let summary = self.writer.finish()?;
        let info = SoftLabelsInfo {
            samples: summary.counts.samples,
            tokens: summary.counts.tokens,
            bytes_per_token: summary.bytes_per_token,
            ..info_base
        };
        Ok((summary, info))
    }

    fn refusal(&self, s: &MappingStats, teacher: &str) -> String {
        format!(
            "soft labels: {:.1}% of the teacher's tokens ({} of {}: {} with no id in the student's vocabulary, {} tokenized differently) do not carry over from {teacher} to the tokenizer {}, above soft_labels.max_mismatch_rate = {}; their tokenizers differ. HINT: re-score the samples with a local teacher that shares the student's tokenizer (`distill gen-data --rescore`), or set soft_labels.enabled = false",
            100.0 * s.mismatch_rate(),
            s.unmapped + s.misaligned,
            s.tokens,
            s.unmapped,
            s.misaligned,
            self.tokenizer_ref,
            self.max_mismatch_rate
        )
    }

    /// Maps one sample's logprobs; None (with the reason) when the run must stop.
    fn capture(
        &mut self,
        sample: &Sample,
        logprobs: Option<&[TokenLogprob]>,
    ) -> anyhow::Result<Option<String>> {
        let Some(logprobs) = logprobs else {
            return Ok(Some(format!(
                "soft labels: the teacher at {} returned no logprobs (choices[0].logprobs.content) for {}; source = \"api-top-logprobs\" needs a server that returns them (vLLM, SGLang, Ollama >= 0.12.11, llama.cpp; the DeepSeek API does not for deepseek-reasoner). HINT: set soft_labels.enabled = false, or re-score locally (`distill gen-data --rescore`)",
                sample.endpoint, self.teacher
            )));
        };
        let m = map_sample(&self.map, &self.tokenizer, logprobs, self.k)?;
        let mut total = self.stats;
        total.add(&m.stats);
        if total.tokens >= MIN_TOKENS_TO_JUDGE && total.mismatch_rate() > self.max_mismatch_rate {
            let teacher = if sample.teacher_model.is_empty() {
                &self.teacher
            } else {
                &sample.teacher_model
            };
            return Ok(Some(self.refusal(&total, teacher)));
        }
        self.stats = total;
        let record = SoftRecord::new(m.ids, m.k, m.top_ids, m.top_logprobs).map_err(anyhow::Error::msg)?;
        self.writer.append(&sample.key, &record)?;
        Ok(None)
    }
}

impl SampleHook for SoftCapture {
    fn before_append(
        &mut self,
        sample: &Sample,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Result<Option<String>, TeacherError> {
        self.capture(sample, logprobs)
            .map_err(|e| TeacherError::Hook(e.into()))
    }
}
