//! On-policy steps (`[on_policy]`): the student samples completions of prompts with its current
//! weights, through the shared generation engine in this process, and the local teacher grades
//! every sampled token (GKD, Agarwal et al. 2024; TRL's `GKDTrainer`; Thinking Machines'
//! "On-Policy Distillation", 2025).
//!
//! Which steps are on-policy is a seeded draw per step (share = TRL's `lmbda`), so a resumed
//! run makes the same choices. Samples for `buffer_steps` on-policy steps are drawn at once
//! from the weights of the first of them; a checkpoint inside such a window stores the
//! window's samples, so `--resume` trains on exactly what the interrupted run would have.

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::recipe::{KlKind, OnPolicyDivergence, OnPolicySection, OnPolicyTeacher};
use distill_data::examples::{Example, IGNORE, Row, example, pack, shuffled, uniform01};
use distill_data::prompts::{PromptSpec, load_prompts};
use distill_hf::hub::HubSettings;
use distill_hf::tokenizer::TextTokenizer;
use distill_infer::generate::{
    Decoding, FinishReason, GenerationConfig, Request, Sampling, eos_ids, generate, kv_cache_tokens_holding,
};
use distill_models::{CausalLm, Kernels};
use serde::{Deserialize, Serialize};

use distill_teacher::grade::{Grader, Grades};

use crate::loss::{LossConfig, TeacherTargets};
use crate::parallel::{Collective, shard};
use crate::trainer::{Teacher, TrainError};

/// The checkpoint file holding the samples of an unfinished buffer window.
pub const ROLLOUTS: &str = "rollouts.json";

/// Samples (of as many held-out prompts, taken in turn) that measure the reverse KL to the
/// teacher.
const EVAL_SAMPLES: usize = 64;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub prompt_id: String,
    pub prompt: Vec<u32>,
    /// The sampled tokens, ending with the EOS token that stopped them (if one did).
    pub completion: Vec<u32>,
    pub finish: FinishReason,
}

/// What one round of sampling cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RolloutStats {
    pub new_tokens: usize,
    pub seconds: f64,
}

/// On-policy steps run in this invocation, and the held-out per-token reverse KL to the
/// teacher on the student's own samples before the run and at its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OnPolicyReport {
    pub steps: usize,
    pub reverse_kl_before: Option<f64>,
    pub reverse_kl_after: Option<f64>,
}

/// A prompt, tokenized with the student's chat template up to the assistant's turn.
#[derive(Debug, Clone)]
struct PromptIds {
    id: String,
    ids: Vec<u32>,
}

/// The samples of one buffer window, one list per on-policy step of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Window {
    index: usize,
    steps: Vec<Vec<Rollout>>,
}

pub struct OnPolicy<B: Backend> {
    cfg: OnPolicySection,
    /// train.seq_len: a sample's prompt and completion at most.
    seq_len: usize,
    seed: u64,
    prompts: Vec<PromptIds>,
    held_out: Vec<PromptIds>,
    /// The teacher as the on-policy loss reads it: the local model, or the served teacher's
    /// grades of the current step's samples.
    pub teacher: Teacher<B>,
    /// The served teacher, when it grades.
    grader: Option<Grader>,
    /// kd_ratio 1 (the student's own tokens are no labels to imitate), beta and temperature
    /// from `[on_policy]`.
    pub loss: LossConfig,
    window: Option<Window>,
    /// What this invocation did, for the run's report.
    pub report: OnPolicyReport,
    /// This data-parallel worker's rank and the number of workers: each samples its
    /// [`shard`] of every step's requests ([`crate::parallel`]).
    worker: (usize, usize),
}

impl<B: Kernels> OnPolicy<B> {
    /// `teacher`: the local teacher (sharing the student's tokenizer), None when a server
    /// grades (`[on_policy] teacher = "server"`). Prompts come from
    /// `[on_policy] prompts`, else from the training samples; held-out prompts (for the reverse
    /// KL measurement) from the held-out samples.
    pub fn new(
        recipe: &Recipe,
        tokenizer: &TextTokenizer,
        train_set: &[Example],
        held_out: &[Example],
        teacher: Option<CausalLm<B>>,
        hub: &HubSettings,
    ) -> Result<Self, TrainError> {
        let cfg = recipe.on_policy.clone();
        let room = recipe.train.seq_len - cfg.max_new_tokens;
        let prompts = match &cfg.prompts {
            Some(source) => prompts_from_file(recipe, source, tokenizer, hub)?,
            None => prompts_of(train_set),
        };
        let fitting: Vec<PromptIds> = prompts.into_iter().filter(|p| p.ids.len() <= room).collect();
        if fitting.is_empty() {
            return Err(TrainError::Refused(format!(
                "[on_policy]: no prompt fits train.seq_len = {} with room for max_new_tokens = {}; \
                 HINT: raise train.seq_len or lower on_policy.max_new_tokens",
                recipe.train.seq_len, cfg.max_new_tokens
            )));
        }
        let held_out = prompts_of(held_out)
            .into_iter()
            .filter(|p| p.ids.len() <= room)
            .take(EVAL_SAMPLES)
            .collect();
        let vocab_limit = Some(tokenizer.vocab_size());
        let loss = LossConfig {
            kd_ratio: 1.0,
            kind: KlKind::Jsd,
            beta: cfg.beta,
            temperature: cfg.temperature,
            ..LossConfig::from_recipe(&recipe.loss, vocab_limit)
        };
        let sampled = cfg.divergence == OnPolicyDivergence::SampledReverseKl;
        let (teacher, grader) = match (cfg.teacher, teacher) {
            (OnPolicyTeacher::Local, Some(m)) if sampled => (Teacher::LocalSampled(Box::new(m)), None),
            (OnPolicyTeacher::Local, Some(m)) => (Teacher::Local(Box::new(m)), None),
            (OnPolicyTeacher::Local, None) => {
                return Err(TrainError::Refused(
                    "[on_policy] teacher = \"local\" needs [teacher] local_model".into(),
                ));
            }
            (OnPolicyTeacher::Server, _) => {
                let grader = Grader::from_recipe(recipe, cfg.top_k)
                    .map_err(|e| TrainError::Refused(format!("[on_policy] teacher = \"server\": {e}")))?;
                (Teacher::None, Some(grader))
            }
        };
        Ok(OnPolicy {
            seed: recipe.train.seed,
            seq_len: recipe.train.seq_len,
            cfg,
            prompts: fitting,
            held_out,
            teacher,
            grader,
            loss,
            window: None,
            report: OnPolicyReport::default(),
            worker: (0, 1),
        })
    }

    /// Makes this the on-policy sampler of data-parallel worker `rank` of `world`: it draws
    /// only its share of each step's samples (each sample's seed is its own, so the share
    /// holds what one worker would draw for those requests).
    pub fn for_worker(&mut self, rank: usize, world: usize) {
        self.worker = (rank, world);
    }

    /// This worker's share of the `n` samples of a step.
    fn mine(&self, n: usize) -> std::ops::Range<usize> {
        shard(n, self.worker.0, self.worker.1)
    }

    /// Whether optimizer step `step` (0-based) trains on the student's samples.
    pub fn is_on_policy(&self, step: usize) -> bool {
        on_policy_step(self.seed, self.cfg.share, step)
    }

    /// How many of the steps before `step` were on-policy: the index of step `step`'s samples.
    fn on_policy_steps_before(&self, step: usize) -> usize {
        (0..step).filter(|&s| self.is_on_policy(s)).count()
    }

    /// The samples of on-policy step `step` (this worker's share of its `n`): drawn from
    /// `model` when the buffer does not hold them (with the stats of that round), else the
    /// buffered ones. Counts the step in [`OnPolicy::report`].
    pub fn rollouts(
        &mut self,
        model: &CausalLm<B>,
        tokenizer: &TextTokenizer,
        step: usize,
        n: usize,
        device: &B::Device,
    ) -> Result<(Vec<Rollout>, Option<RolloutStats>), TrainError> {
        let k = self.on_policy_steps_before(step);
        let per_window = self.cfg.buffer_steps;
        let index = k / per_window;
        let mut stats = None;
        if self.window.as_ref().is_none_or(|w| w.index != index) {
            let first = index * per_window;
            let mine = self.mine(n);
            let requests: Vec<(String, Request)> = (first..first + per_window)
                .flat_map(|k| self.requests(k, n).drain(mine.clone()).collect::<Vec<_>>())
                .collect();
            let (all, s) = self.sample(model, tokenizer, &requests, device)?;
            stats = Some(s);
            self.window = Some(Window {
                index,
                steps: all.chunks(mine.len().max(1)).map(<[Rollout]>::to_vec).collect(),
            });
        }
        let window = self.window.as_ref().expect("filled above");
        self.report.steps += 1;
        Ok((window.steps[k % per_window].clone(), stats))
    }

    /// The `n` requests of on-policy step `k`: its prompts in a seeded order, a new order each
    /// pass over the prompts, `samples_per_prompt` seeds each.
    fn requests(&self, k: usize, n: usize) -> Vec<(String, Request)> {
        let per_prompt = self.cfg.samples_per_prompt;
        let count = self.prompts.len();
        let first = k * n.div_ceil(per_prompt);
        let mut order: Option<(usize, Vec<usize>)> = None;
        (0..n)
            .map(|i| {
                let g = first + i / per_prompt;
                let pass = g / count;
                if order.as_ref().is_none_or(|(p, _)| *p != pass) {
                    let indices: Vec<usize> = (0..count).collect();
                    let seed = self.seed ^ (pass as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    order = Some((pass, shuffled(&indices, seed)));
                }
                let p = &self.prompts[order.as_ref().expect("set above").1[g % count]];
                let request = Request {
                    prompt: p.ids.clone(),
                    seed: mix(self.seed, (k * n + i) as u64),
                };
                (p.id.clone(), request)
            })
            .collect()
    }

    /// `[on_policy] kv_cache_gib` in positions of `model`'s cache; it must hold one sample of
    /// train.seq_len, or samples would end early for want of cache.
    fn kv_cache_tokens(&self, model: &CausalLm<B>) -> Result<Option<usize>, TrainError> {
        let Some(gib) = self.cfg.kv_cache_gib else {
            return Ok(None);
        };
        kv_cache_tokens_holding(model, gib, self.seq_len)
            .map(Some)
            .map_err(|e| {
                TrainError::Refused(format!("on_policy.kv_cache_gib: {e} (train.seq_len): raise it"))
            })
    }

    fn sample(
        &self,
        model: &CausalLm<B>,
        tokenizer: &TextTokenizer,
        requests: &[(String, Request)],
        device: &B::Device,
    ) -> Result<(Vec<Rollout>, RolloutStats), TrainError> {
        let started = Instant::now();
        let cfg = GenerationConfig {
            decoding: Decoding {
                max_new_tokens: self.cfg.max_new_tokens,
                sampling: Sampling {
                    temperature: self.cfg.temperature,
                    top_p: self.cfg.top_p,
                    top_k: 0,
                },
                stop: Vec::new(),
                eos: eos_ids(model, tokenizer),
                logprobs: None,
            },
            batch_size: self.cfg.gen_batch,
            kv_cache_tokens: self.kv_cache_tokens(model)?,
        };
        let plain: Vec<Request> = requests.iter().map(|(_, r)| r.clone()).collect();
        let (generations, _) = generate(model, tokenizer, &plain, &cfg, device, |_, _| {})
            .map_err(|e| TrainError::Refused(format!("[on_policy] sampling: {e}")))?;
        // The KV caches' buffers go back before the training step's activations are made.
        B::trim_memory(device);
        let rollouts: Vec<Rollout> = requests
            .iter()
            .zip(generations)
            .map(|((id, r), g)| Rollout {
                prompt_id: id.clone(),
                prompt: r.prompt.clone(),
                completion: g.tokens.into_iter().chain(g.eos).collect(),
                finish: g.finish_reason,
            })
            .collect();
        let stats = RolloutStats {
            new_tokens: rollouts.iter().map(|r| r.completion.len()).sum(),
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((rollouts, stats))
    }

    /// Training rows of `rollouts`, one sample a row, padded to the longest; a served teacher
    /// grades them here, and [`OnPolicy::teacher`] holds its grades until the next call.
    pub fn rows(&mut self, rollouts: &[Rollout], pad_id: u32) -> Result<Vec<Row>, TrainError> {
        let rows = rows_of(rollouts, self.cfg.mask_truncated, pad_id);
        if let Some(grader) = &self.grader {
            let sampled = self.cfg.divergence == OnPolicyDivergence::SampledReverseKl;
            self.teacher = Teacher::Graded(Box::new(grade(grader, rollouts, &rows, sampled)?));
        }
        Ok(rows)
    }

    /// The buffered samples a checkpoint at the end of step `done_steps` must keep: those of
    /// a window with on-policy steps still to train, every worker's (every worker of `group`
    /// calls this; worker 0 gets the whole window, the others their own share).
    pub fn unfinished_window(
        &self,
        done_steps: usize,
        group: &dyn Collective<B>,
    ) -> Result<Option<Vec<u8>>, TrainError> {
        let Some(w) = self.window.as_ref() else {
            return Ok(None);
        };
        let k = self.on_policy_steps_before(done_steps);
        if k / self.cfg.buffer_steps != w.index || k.is_multiple_of(self.cfg.buffer_steps) {
            return Ok(None);
        }
        let mine = serde_json::to_vec(w).expect("rollouts serialize");
        if group.world() == 1 {
            return Ok(Some(mine));
        }
        let shares = group.all_gather_bytes(&mine)?;
        let mut whole = Window {
            index: w.index,
            steps: vec![Vec::new(); w.steps.len()],
        };
        for share in shares {
            let part: Window = serde_json::from_slice(&share)
                .map_err(|e| TrainError::Refused(format!("a worker's buffered samples: {e}")))?;
            for (step, rollouts) in whole.steps.iter_mut().zip(part.steps) {
                step.extend(rollouts);
            }
        }
        Ok(Some(serde_json::to_vec(&whole).expect("rollouts serialize")))
    }

    /// Puts back the samples a checkpoint kept ([`ROLLOUTS`]).
    pub fn restore_window(&mut self, bytes: &[u8], path: &std::path::Path) -> Result<(), TrainError> {
        let w: Window = serde_json::from_slice(bytes)
            .map_err(|e| TrainError::Refused(format!("{}: {e}", path.display())))?;
        // Every step's samples were saved whole; this worker keeps its share.
        let steps = w
            .steps
            .into_iter()
            .map(|all| all[self.mine(all.len())].to_vec())
            .collect();
        self.window = Some(Window {
            index: w.index,
            steps,
        });
        Ok(())
    }

    /// Per-token reverse KL(student || teacher) at temperature 1 on 64 of the student's own
    /// samples of held-out prompts (up to 64 prompts, taken in turn; seeded, so two
    /// measurements differ only by the weights): what on-policy distillation lowers. None
    /// without held-out prompts.
    pub fn held_out_reverse_kl(
        &self,
        model: &CausalLm<B>,
        tokenizer: &TextTokenizer,
        pad_id: u32,
        micro_batch: usize,
        device: &B::Device,
    ) -> Result<Option<f64>, TrainError> {
        if self.held_out.is_empty() {
            return Ok(None);
        }
        let requests: Vec<(String, Request)> = (0..EVAL_SAMPLES)
            .map(|i| (i, &self.held_out[i % self.held_out.len()]))
            .map(|(i, p)| {
                let request = Request {
                    prompt: p.ids.clone(),
                    seed: mix(self.seed ^ 0x4845_4c44, i as u64),
                };
                (p.id.clone(), request)
            })
            .collect();
        let (rollouts, _) = self.sample(model, tokenizer, &requests, device)?;
        let rows = rows_of(&rollouts, false, pad_id);
        // Exact for a local teacher; for a served one (its log-probability of each sampled
        // token alone) the sampled-token estimate of the same quantity.
        let teacher = match (&self.teacher, &self.grader) {
            (Teacher::Local(m) | Teacher::LocalSampled(m), _) => Teacher::Local(m.clone()),
            (_, Some(grader)) => Teacher::Graded(Box::new(grade(grader, &rollouts, &rows, true)?)),
            _ => return Ok(None),
        };
        let reverse = LossConfig {
            kind: KlKind::Reverse,
            temperature: 1.0,
            ..self.loss
        };
        crate::trainer::mean_loss(model, &teacher, &rows, &reverse, micro_batch, device)
    }
}

/// The served teacher's grades of `rollouts`, keyed as their `rows` are.
fn grade(
    grader: &Grader,
    rollouts: &[Rollout],
    rows: &[Row],
    sampled: bool,
) -> Result<GradedTargets, TrainError> {
    let sequences: Vec<Vec<u32>> = rollouts
        .iter()
        .map(|r| r.prompt.iter().chain(&r.completion).copied().collect())
        .collect();
    let grades = grader
        .grade(&sequences)
        .map_err(|e| TrainError::Refused(format!("[on_policy] grading the student's samples: {e}")))?;
    let keys = rows.iter().map(|r| r.keys[0].clone());
    Ok(GradedTargets {
        k: grader.k(),
        sampled,
        grades: keys.zip(grades).collect(),
    })
}

/// A seeded draw per step: on-policy with probability `share`.
pub fn on_policy_step(seed: u64, share: f64, step: usize) -> bool {
    share >= 1.0 || (share > 0.0 && uniform01(&mut mix(seed ^ 0x6f6e_706f_6c69_6379, step as u64)) < share)
}

fn mix(seed: u64, i: u64) -> u64 {
    seed ^ i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Each prompt once, in first-seen order, as the samples render it: the ids up to the first
/// label (the template's assistant header included).
fn prompts_of(examples: &[Example]) -> Vec<PromptIds> {
    let mut seen = std::collections::HashSet::new();
    examples
        .iter()
        .filter(|ex| seen.insert(ex.prompt_id.clone()))
        .filter_map(|ex| {
            let first = ex.labels.iter().position(|&l| l != IGNORE)?;
            Some(PromptIds {
                id: ex.prompt_id.clone(),
                ids: ex.input_ids[..=first].to_vec(),
            })
        })
        .collect()
}

fn prompts_from_file(
    recipe: &Recipe,
    source: &str,
    tokenizer: &TextTokenizer,
    hub: &HubSettings,
) -> Result<Vec<PromptIds>, TrainError> {
    let d = &recipe.data;
    let spec = PromptSpec {
        source: source.to_string(),
        prompt_field: d.prompt_field.clone(),
        reference_field: d.reference_field.clone(),
        id_field: d.id_field.clone(),
        max_prompts: d.max_prompts,
    };
    let prompts =
        load_prompts(&spec, hub).map_err(|e| TrainError::Refused(format!("[on_policy] prompts: {e}")))?;
    prompts
        .into_iter()
        .map(|p| {
            Ok(PromptIds {
                ids: tokenizer.encode_chat(&p.messages, true)?,
                id: p.id,
            })
        })
        .collect()
}

/// One sample a row: loss on the completion's tokens (none on a truncated one when masked).
fn rows_of(rollouts: &[Rollout], mask_truncated: bool, pad_id: u32) -> Vec<Row> {
    let examples: Vec<Example> = rollouts
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = format!("{}#{i}", r.prompt_id);
            let mut ex = example(r.prompt.clone(), r.completion.clone(), r.prompt_id.clone(), key);
            if mask_truncated && r.finish == FinishReason::Length {
                ex.labels.fill(IGNORE);
            }
            ex
        })
        .collect();
    let width = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
    pack(&examples, width, false, pad_id)
}

/// A served teacher's grades of one step's samples, as targets for their rows.
pub struct GradedTargets {
    k: usize,
    /// Read only the sampled token's log-probability (the sampled-token estimator), rather
    /// than the top-k.
    sampled: bool,
    /// Per row key ([`Row::keys`]): grade i is of token i of the sample.
    grades: std::collections::HashMap<String, Grades>,
}

impl GradedTargets {
    /// The teacher's view of every loss position of `rows`, in order: its top-k (absent
    /// entries -inf), or the sampled token's log-probability.
    pub fn for_rows<B: Backend>(
        &self,
        rows: &[Row],
        device: &B::Device,
    ) -> Result<TeacherTargets<B>, TrainError> {
        let k = self.k;
        let (mut ids, mut logprobs, mut sampled) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            // Where each document of the row starts: grades count from a sample's first token.
            let mut starts = std::collections::HashMap::new();
            for (i, &d) in row.docs.iter().enumerate() {
                starts.entry(d).or_insert(i);
            }
            for (i, &label) in row.labels.iter().enumerate() {
                if label == IGNORE {
                    continue;
                }
                let doc = row.docs[i];
                let start = starts[&doc];
                let key = row.keys.get(doc as usize).map(String::as_str).unwrap_or("");
                // Label i is token i + 1 of the sample: the server's grade i + 1.
                let graded = self
                    .grades
                    .get(key)
                    .and_then(|g| g.get(i - start + 1))
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        TrainError::Refused(format!("sample {key}: no grade for its token {}", i - start + 1))
                    })?;
                if self.sampled {
                    let lp = graded.token.ok_or_else(|| {
                        TrainError::Refused(format!(
                            "sample {key}: the teacher server left out the log-probability of token {} \
                             (vLLM and `distill serve` list it beside the top-k)",
                            i - start + 1
                        ))
                    })?;
                    sampled.push(lp);
                    continue;
                }
                for j in 0..k {
                    let (id, lp) = graded.top.get(j).copied().unwrap_or((0, f32::NEG_INFINITY));
                    ids.push(i64::from(id));
                    logprobs.push(lp);
                }
            }
        }
        let f32_on = (device, burn::tensor::DType::F32);
        Ok(if self.sampled {
            let n = sampled.len();
            TeacherTargets::Sampled(Tensor::from_data(TensorData::new(sampled, [n]), f32_on))
        } else {
            let n = ids.len() / k;
            TeacherTargets::Sparse {
                ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, k]), device),
                logprobs: Tensor::from_data(TensorData::new(logprobs, [n, k]), f32_on),
                present: None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::activation::log_softmax;
    use distill_teacher::grade::Graded;

    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        distill_core::testing::fixtures().join(name)
    }

    /// A served teacher's grades, made here from the local teacher exactly as a server computes
    /// them (entry j: the distribution over token j given the tokens before it), must give the
    /// targets the local teacher gives at every loss position: the sampled token's
    /// log-probability, and the most likely ids.
    #[test]
    fn served_grades_line_up_with_the_local_teacher_at_every_label() {
        let device = Default::default();
        let teacher = CausalLm::<Flex>::load(&fixture("tiny-llama"), &device).unwrap();
        let rollouts = vec![
            Rollout {
                prompt_id: "a".into(),
                prompt: vec![5, 6, 7],
                completion: vec![40, 41, 42, 43],
                finish: FinishReason::Stop,
            },
            Rollout {
                prompt_id: "b".into(),
                prompt: vec![9, 10],
                completion: vec![50, 51],
                finish: FinishReason::Length,
            },
        ];
        let rows = rows_of(&rollouts, false, 0);
        let v = teacher.config.vocab_size;
        let mut grades = std::collections::HashMap::new();
        for (r, row) in rollouts.iter().zip(&rows) {
            let seq: Vec<u32> = r.prompt.iter().chain(&r.completion).copied().collect();
            let ids: Vec<i64> = seq.iter().map(|&t| i64::from(t)).collect();
            let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, seq.len()]), &device);
            let lp = log_softmax(
                teacher.logits(teacher.hidden_states_packed(ids, &[vec![0; seq.len()]])),
                2,
            );
            let lp = lp.into_data().convert::<f32>().into_vec::<f32>().unwrap(); // [T, V]
            let mut g: Grades = vec![None];
            for j in 1..seq.len() {
                let dist = &lp[(j - 1) * v..j * v];
                let mut top: Vec<(u32, f32)> = dist.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
                top.sort_by(|a, b| b.1.total_cmp(&a.1));
                top.truncate(3);
                g.push(Some(Graded {
                    top,
                    token: Some(dist[seq[j] as usize]),
                }));
            }
            grades.insert(row.keys[0].clone(), g);
        }
        let graded = |sampled| GradedTargets {
            k: 3,
            sampled,
            grades: grades.clone(),
        };

        // The local teacher's targets at the same rows, as training computes them.
        let (ids, docs, positions, labels) = crate::trainer::batch_tensors::<Flex>(&rows, &device);
        let positions = positions.unwrap();
        let local = Teacher::Local(Box::new(teacher.clone()));
        let local =
            crate::trainer::teacher_targets(&local, ids, &docs, &positions, &labels, &rows, v).unwrap();
        let TeacherTargets::Sampled(want) = local.at_labels(labels, Some(v)) else {
            panic!("at_labels gives Sampled");
        };
        let TeacherTargets::Sampled(got) = graded(true).for_rows::<Flex>(&rows, &device).unwrap() else {
            panic!("sampled grades give Sampled");
        };
        let (want, got) = (
            want.into_data().to_vec::<f32>().unwrap(),
            got.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(want.len(), 4 + 2, "a loss position per completion token");
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() < 1e-5, "{want:?} vs {got:?}");
        }
        let TeacherTargets::Sparse { ids, .. } = graded(false).for_rows::<Flex>(&rows, &device).unwrap()
        else {
            panic!("top-k grades give Sparse");
        };
        assert_eq!(ids.dims(), [want.len(), 3]);
    }
}
