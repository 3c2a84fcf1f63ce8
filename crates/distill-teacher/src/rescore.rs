//! Local re-scoring: a teacher model run teacher-forced over a dataset's samples, writing its
//! top-k log-probabilities for every response token into `<dataset>/soft/` (source
//! `local-rescore`). This is the route to KL distillation when the teacher's API gives no
//! log-probabilities (DeepSeek's) or another vocabulary (R1's 129k tokens): re-score R1's
//! text with a local teacher that shares the student's vocabulary, e.g.
//! DeepSeek-R1-Distill-Qwen-7B for a Qwen2.5 student.
//!
//! Samples are rendered and tokenized exactly as training does, with the student's tokenizer
//! and chat template when a student is named (else the teacher's), so each record covers
//! precisely the tokens the trainer puts a loss on. The store is resumable: samples already
//! in it are skipped, and a killed run loses at most the sample in flight.

use std::path::PathBuf;

use distill_core::recipe::{LogprobDtype, SoftLabelSource};
use distill_data::examples::{DataOptions, Example, load_held_out};
use distill_data::soft::{SoftMeta, SoftRecord, SoftSummary, SoftWriter, soft_dir};
use distill_hf::hub::{self, HubSettings};
use distill_hf::tokenizer::TextTokenizer;
use distill_models::{CausalLm, Kernels};

use distill_core::progress::Progress;
use distill_infer::score::{loss_positions, teacher_force_batch};

/// Why re-scoring stopped; each names the file, model or record at fault.
#[derive(Debug, thiserror::Error)]
pub enum RescoreError {
    #[error(transparent)]
    Model(#[from] distill_hf::ModelError),
    #[error(transparent)]
    Samples(#[from] distill_data::examples::ExampleError),
    #[error(transparent)]
    Infer(#[from] distill_infer::InferError),
    #[error("{0}")]
    Invalid(String),
}

/// Below this share of identical ids, teacher and student do not share a vocabulary.
const MIN_SHARED_IDS: f64 = 0.99;

#[derive(Debug, Clone)]
pub struct RescoreSpec {
    /// A gen-data dataset (samples-*.jsonl); soft labels go to its `soft/`.
    pub dataset: PathBuf,
    /// The teacher: an HF directory or `org/name[@rev]`.
    pub teacher: String,
    /// Whose tokenizer and chat template render the samples (the student's); None: the
    /// teacher's.
    pub student: Option<String>,
    pub k: usize,
    pub dtype: LogprobDtype,
    /// Longest tokenized sample (longer ones are cut, as training cuts them).
    pub seq_len: usize,
    /// Samples are forced together up to this many (padded) tokens per batch.
    pub batch_tokens: usize,
}

/// Consecutive groups whose padded size (count x longest) stays within `budget` tokens; a
/// sample longer than the budget goes alone.
fn token_batches<'a>(examples: &[&'a Example], budget: usize) -> Vec<Vec<&'a Example>> {
    let mut out: Vec<Vec<&Example>> = Vec::new();
    let mut longest = 0;
    for &ex in examples {
        let len = ex.input_ids.len();
        match out.last_mut() {
            Some(b) if (b.len() + 1) * longest.max(len) <= budget => {
                b.push(ex);
                longest = longest.max(len);
            }
            _ => {
                out.push(vec![ex]);
                longest = len;
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct RescoreSummary {
    pub scored: usize,
    pub already_present: usize,
    pub store: SoftSummary,
}

pub fn rescore<B: Kernels>(
    spec: &RescoreSpec,
    device: &B::Device,
    progress: &dyn Progress,
) -> Result<RescoreSummary, RescoreError> {
    let settings = HubSettings::from_env();
    let teacher_dir = hub::resolve(&spec.teacher, &settings)?;
    let teacher_tokenizer = TextTokenizer::from_dir(&teacher_dir)?;
    let (tokenizer, tokenizer_ref) = match &spec.student {
        Some(s) => (TextTokenizer::from_dir(&hub::resolve(s, &settings)?)?, s.clone()),
        None => (TextTokenizer::from_dir(&teacher_dir)?, spec.teacher.clone()),
    };
    check_shared_vocabulary(&tokenizer, &teacher_tokenizer, &tokenizer_ref, &spec.teacher)?;

    let opts = DataOptions {
        seq_len: spec.seq_len,
        held_out: 1.0,
        keep_truncated: true,
        keep_only_correct: false,
    };
    let examples = load_held_out(&spec.dataset, &tokenizer, &opts)?;
    let meta = SoftMeta {
        source: SoftLabelSource::LocalRescore,
        k: spec.k,
        temperature: 1.0,
        dtype: spec.dtype,
        tokenizer_hash: tokenizer.hash.clone(),
        tokenizer: tokenizer_ref,
        vocab_size: tokenizer.vocab_size(),
    };
    let mut writer = SoftWriter::create_or_resume(&soft_dir(&spec.dataset), meta).map_err(store_error)?;
    let todo: Vec<_> = examples.iter().filter(|e| !writer.contains(&e.key)).collect();
    let already_present = examples.len() - todo.len();

    let model = CausalLm::<B>::load(&teacher_dir, device)?;
    progress.stage("re-scoring", todo.len() as u64);
    for batch in token_batches(&todo, spec.batch_tokens) {
        let forced = teacher_force_batch(&model, &batch, spec.k, None, device)?;
        for (ex, f) in batch.iter().zip(forced) {
            let top = f.top.expect("top-k was asked for");
            let ids = loss_positions(ex).iter().map(|&p| ex.labels[p] as u32).collect();
            let record =
                SoftRecord::new(ids, spec.k, top.ids, top.logprobs).map_err(RescoreError::Invalid)?;
            writer.append(&ex.key, &record).map_err(store_error)?;
            progress.advance(1);
        }
    }
    progress.finish_stage();
    let store = writer.finish().map_err(store_error)?;
    Ok(RescoreSummary {
        scored: todo.len(),
        already_present,
        store,
    })
}

fn store_error(e: distill_data::soft::SoftError) -> RescoreError {
    RescoreError::Invalid(e.to_string())
}

/// The teacher must give its distribution over the same ids the samples are tokenized into.
fn check_shared_vocabulary(
    tokenizer: &TextTokenizer,
    teacher: &TextTokenizer,
    tokenizer_ref: &str,
    teacher_ref: &str,
) -> Result<(), RescoreError> {
    if tokenizer.hash == teacher.hash {
        return Ok(());
    }
    let (same, total) = tokenizer.shared_ids(teacher);
    let share = same as f64 / total.max(1) as f64;
    if share < MIN_SHARED_IDS {
        return Err(RescoreError::Invalid(format!(
            "teacher {teacher_ref} and {tokenizer_ref} do not share a vocabulary ({same} of {total} ids name the same token); \
             HINT: re-score with a teacher of the student's family (e.g. DeepSeek-R1-Distill-Qwen for a Qwen2.5 student)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use burn::backend::Flex;
    use distill_core::Recipe;
    use distill_data::soft::SoftLabels;
    use distill_train::trainer::{TrainOptions, train};

    use super::*;
    use distill_core::progress::Silent;

    use distill_core::testing::fixtures;

    fn copy_dataset(to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(fixtures().join("dataset")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    fn spec(dataset: &Path, k: usize) -> RescoreSpec {
        RescoreSpec {
            dataset: dataset.to_path_buf(),
            teacher: fixtures().join("tiny-llama").display().to_string(),
            student: Some(fixtures().join("tiny-qwen2").display().to_string()),
            k,
            dtype: LogprobDtype::F16,
            // The fixture tokenizer is tiny (384 ids): its prompts run to 300 tokens.
            seq_len: 1024,
            batch_tokens: 4096,
        }
    }

    fn first_step_loss(dataset: &Path, out: &Path, teacher: Option<&str>) -> f64 {
        let fx = fixtures();
        let mut sets = vec![
            format!("student.model={:?}", fx.join("tiny-qwen2").to_str().unwrap()),
            format!("data.dataset={:?}", dataset.to_str().unwrap()),
            format!("train.out={:?}", out.to_str().unwrap()),
            "train.seq_len=1024".into(),
            "train.max_steps=1".into(),
            "train.micro_batch=2".into(),
            "train.grad_accum=1".into(),
            "loss.kd_ratio=1.0".into(),
            "loss.temperature=1.0".into(),
            // With k = V the stored top-k is the whole distribution; renormalising it avoids a
            // spurious "rest" bucket of f16 rounding error (1 - sum p ~ 1e-3, against a
            // student rest of ~1e-7), which would dominate a KL this small.
            "loss.missing_mass=\"renormalize\"".into(),
            "lora.enabled=false".into(),
        ];
        if let Some(t) = teacher {
            sets.push(format!("teacher.local_model={t:?}"));
        }
        let r = Recipe::parse("name = \"t\"\n", Path::new("test.toml"), &sets).unwrap();
        let opts = TrainOptions {
            resume: false,
            stop_after: None,
            progress: &distill_core::progress::Silent,
        };
        train::<Flex>(&r, Default::default(), &opts).unwrap().losses[0]
    }

    /// Re-scored soft labels over the whole vocabulary carry the teacher's full distribution:
    /// training on them gives the loss of training against the live teacher (to f16 rounding
    /// of the stored log-probs), which checks the store, the alignment and the sparse loss
    /// end to end.
    #[test]
    fn full_vocabulary_soft_labels_train_like_the_live_teacher() {
        let tmp = tempfile::tempdir().unwrap();
        let dataset = tmp.path().join("data");
        copy_dataset(&dataset);
        let summary = rescore::<Flex>(&spec(&dataset, 384), &Default::default(), &Silent).unwrap();
        assert_eq!(summary.scored, 48);
        let store = SoftLabels::open(&soft_dir(&dataset)).unwrap();
        assert_eq!(store.len(), 48);
        assert_eq!(store.manifest().source, SoftLabelSource::LocalRescore);

        let live = first_step_loss(
            &fixtures().join("dataset"),
            &tmp.path().join("a"),
            Some(&fixtures().join("tiny-llama").display().to_string()),
        );
        let stored = first_step_loss(&dataset, &tmp.path().join("b"), None);
        assert!(
            (live - stored).abs() < 2e-3 * live.abs(),
            "live teacher {live} vs stored soft labels {stored}"
        );

        // A second run finds everything scored.
        let again = rescore::<Flex>(&spec(&dataset, 384), &Default::default(), &Silent).unwrap();
        assert_eq!((again.scored, again.already_present), (0, 48));
    }

    #[test]
    fn a_resumed_store_must_match_and_foreign_vocabularies_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dataset = tmp.path().join("data");
        copy_dataset(&dataset);
        rescore::<Flex>(&spec(&dataset, 4), &Default::default(), &Silent).unwrap();
        let err = rescore::<Flex>(&spec(&dataset, 8), &Default::default(), &Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains("manifest.json") && err.contains('k'), "{err}");

        // A teacher whose ids mean other tokens (the vocabulary reversed) is refused before
        // any weights load.
        let teacher = tmp.path().join("foreign");
        std::fs::create_dir_all(&teacher).unwrap();
        for f in ["config.json", "tokenizer_config.json"] {
            std::fs::copy(fixtures().join("tiny-llama").join(f), teacher.join(f)).unwrap();
        }
        let mut tok: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("tiny-llama/tokenizer.json")).unwrap(),
        )
        .unwrap();
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        let n = vocab.len() as u64;
        for id in vocab.values_mut() {
            *id = (n - 1 - id.as_u64().unwrap()).into();
        }
        std::fs::write(teacher.join("tokenizer.json"), tok.to_string()).unwrap();
        let foreign = RescoreSpec {
            teacher: teacher.display().to_string(),
            ..spec(&dataset, 4)
        };
        let err = rescore::<Flex>(&foreign, &Default::default(), &Silent)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not share a vocabulary"), "{err}");
    }
}
