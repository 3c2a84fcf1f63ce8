//! B3, B4 and B5's probes: optimizer steps timed on synthetic rows at real shapes, through
//! the same [`trainer::optimizer_step`] `distill train` runs.

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Int, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::recipe::BaseQuant;
use distill_data::examples::Row;
use distill_models::{CausalLm, DecoderConfig, Kernels};
use distill_train::loss::{LossConfig, TeacherTargets};
use distill_train::trainer::{self, Teacher, TrainError};

use crate::sync;

type Ad<B> = Autodiff<B>;

/// One timed training configuration.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Rows per step and tokens per row (one micro-batch: grad_accum = 1).
    pub batch: usize,
    pub seq: usize,
    /// LoRA rank; None for full fine-tuning.
    pub lora_r: Option<usize>,
    /// The frozen base's storage with LoRA (QLoRA: NF4).
    pub quantize: BaseQuant,
    pub recompute: bool,
    /// Teacher top-k of the KL term (kd_ratio 0.5); 0 trains on CE alone.
    pub top_k: usize,
    /// A local teacher instead of stored top-k: a random model of the student's config held
    /// as this says, its full-vocabulary logits computed every step (as `[teacher]
    /// local_model` in a recipe).
    pub local_teacher: Option<BaseQuant>,
    pub chunk_tokens: usize,
    /// With recompute, tokens per MLP chunk ([train] mlp_chunk_tokens).
    pub mlp_chunk_tokens: usize,
    /// With recompute, block inputs in host memory ([train] offload_block_inputs).
    pub offload_block_inputs: bool,
    /// AdamW's moments in host memory between updates ([train] offload_optimizer).
    pub offload_optimizer: bool,
    /// With recompute, every N-th block's input kept ([train] block_inputs_every).
    pub block_inputs_every: usize,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    /// Sync the device at the end of each phase of the step and time the phases
    /// ([`StepTimes::phases`]). The syncs cost time of their own: compare profiled steps
    /// with each other, not with unprofiled ones.
    pub profile: bool,
}

impl TrainBench {
    /// The recipe `distill train` would run this with.
    pub fn recipe(&self) -> Recipe {
        let mut sets = vec![
            format!("train.seq_len={}", self.seq),
            format!("train.micro_batch={}", self.batch),
            "train.grad_accum=1".into(),
            format!("train.recompute={}", self.recompute),
            format!("train.seed={}", self.seed),
            "train.lr=1e-5".into(),
            format!("loss.chunk_tokens={}", self.chunk_tokens),
            format!("train.mlp_chunk_tokens={}", self.mlp_chunk_tokens),
            format!("train.offload_block_inputs={}", self.offload_block_inputs),
            format!("train.offload_optimizer={}", self.offload_optimizer),
            format!("train.block_inputs_every={}", self.block_inputs_every),
            format!(
                "loss.kd_ratio={}",
                if self.top_k > 0 || self.local_teacher.is_some() {
                    0.5
                } else {
                    0.0
                }
            ),
            format!("lora.enabled={}", self.lora_r.is_some()),
        ];
        if let Some(r) = self.lora_r {
            sets.push(format!("lora.r={r}"));
            sets.push(format!("lora.alpha={}", 2 * r));
            if self.quantize == BaseQuant::Nf4 {
                sets.push("lora.quantize=\"nf4\"".into());
            }
        }
        Recipe::parse("name = \"bench\"\n", Path::new("bench"), &sets).expect("bench recipes are valid")
    }
}

/// Seconds of each timed step (warm-up excluded), and what the steps computed.
#[derive(Debug, Clone)]
pub struct StepTimes {
    pub seconds: Vec<f64>,
    pub tokens_per_step: usize,
    pub losses: Vec<f64>,
    /// With [`TrainBench::profile`]: each phase's mean time per timed step, in
    /// [`trainer::PHASES`] order.
    pub phases: Vec<PhaseTime>,
    /// With [`TrainBench::profile`]: the most device memory in use while the model, optimizer
    /// and teacher were made, before the first step.
    pub setup_peak_bytes: Option<u64>,
}

/// Where one phase of a step went: `host` is the time until the host had queued the phase's
/// work, `total` until the device had finished it (a sync). host close to total means the
/// GPU waited on the host (launch-bound); total far above host means the GPU was the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseTime {
    pub name: &'static str,
    pub host_seconds: f64,
    pub total_seconds: f64,
    /// The device memory the phase left in use (most over all steps), and what the pool had
    /// reserved at its end in the first step, warm-up included: the phase whose reservation
    /// grows is where the peak lives. None where the backend does not say.
    pub in_use_bytes: Option<u64>,
    pub reserved_bytes: Option<u64>,
    /// The most in use at any moment of the phase (over all steps): above `in_use_bytes` by
    /// what the phase made and freed again.
    pub peak_bytes: Option<u64>,
}

/// One reading of the device's memory pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSample {
    pub in_use: u64,
    pub reserved: u64,
    /// The most in use at any moment since the previous reading, where the backend keeps a
    /// high-water mark.
    pub peak: Option<u64>,
}

/// Reads the device's memory pool, where the backend exposes it.
pub type PoolReading<'a> = &'a dyn Fn() -> Option<PoolSample>;

/// Accumulates [`PhaseTime`]s over steps from a [`trainer::PhaseHook`]'s calls.
struct PhaseClock<'a, B: Backend> {
    device: &'a B::Device,
    pool: PoolReading<'a>,
    since: Instant,
    /// Recording times (timed steps) or not (warm-up); memory is read in every step.
    on: bool,
    sums: Vec<PhaseTime>,
}

impl<B: Backend> PhaseClock<'_, B> {
    fn mark(&mut self, name: &'static str) {
        let host = self.since.elapsed().as_secs_f64();
        sync::<B>(self.device);
        let total = self.since.elapsed().as_secs_f64();
        let (host, total) = if self.on { (host, total) } else { (0.0, 0.0) };
        let memory = (self.pool)();
        let peak = memory.and_then(|m| m.peak);
        match self.sums.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.host_seconds += host;
                p.total_seconds += total;
                p.in_use_bytes = p.in_use_bytes.max(memory.map(|m| m.in_use));
                p.peak_bytes = p.peak_bytes.max(peak);
            }
            None => self.sums.push(PhaseTime {
                name,
                host_seconds: host,
                total_seconds: total,
                in_use_bytes: memory.map(|m| m.in_use),
                reserved_bytes: memory.map(|m| m.reserved),
                peak_bytes: peak,
            }),
        }
        self.since = Instant::now();
    }

    /// Mean per step over `steps` steps, in [`trainer::PHASES`] order.
    fn means(mut self, steps: usize) -> Vec<PhaseTime> {
        let n = steps.max(1) as f64;
        self.sums
            .sort_by_key(|p| trainer::PHASES.iter().position(|&q| q == p.name));
        for p in &mut self.sums {
            p.host_seconds /= n;
            p.total_seconds /= n;
        }
        self.sums
    }
}

impl StepTimes {
    pub fn mean_seconds(&self) -> f64 {
        self.seconds.iter().sum::<f64>() / self.seconds.len().max(1) as f64
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens_per_step as f64 / self.mean_seconds().max(1e-12)
    }
}

/// Random-init student at `config`'s shapes, `warmup + steps` optimizer steps through
/// [`trainer::optimizer_step`], each ended by a device sync; `after_step` runs after each
/// (memory sampling); `pool` reads the device's memory pool at the end of each profiled phase.
/// Rows are random tokens, one document each, every position a loss
/// token; the KL term uses a fixed synthetic top-k teacher.
pub fn bench_train<B: Kernels>(
    config: &DecoderConfig,
    b: &TrainBench,
    device: &B::Device,
    after_step: &mut dyn FnMut(),
    pool: PoolReading,
) -> Result<StepTimes, TrainError>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    // As `distill train` allocates (before the device's first use).
    B::exact_allocations();
    let recipe = b.recipe();
    <Ad<B> as Backend>::seed(device, b.seed);
    let student = CausalLm::<Ad<B>>::init_with(config, device, recipe.lora.quantize);
    let mut model = trainer::trainable_student(student, &recipe, device);
    let mut opt = trainer::new_optimizer(&model, &recipe.train);
    let mut rng = b.seed;
    let rows = random_rows(b.batch, b.seq, config.vocab_size, &mut rng);
    let teacher = if let Some(quantize) = b.local_teacher {
        Teacher::Local(Box::new(CausalLm::<B>::init_with(config, device, quantize)))
    } else if b.top_k > 0 {
        Teacher::Fixed(synthetic_teacher::<B>(
            b.batch * b.seq,
            b.top_k,
            config.vocab_size,
            &mut rng,
            device,
        ))
    } else {
        Teacher::None
    };
    let loss_cfg = LossConfig::from_recipe(&recipe.loss, Some(config.vocab_size));
    sync::<B>(device);
    let mut times = StepTimes {
        seconds: Vec::new(),
        tokens_per_step: b.batch * b.seq,
        losses: Vec::new(),
        phases: Vec::new(),
        setup_peak_bytes: if b.profile {
            pool().and_then(|m| m.peak)
        } else {
            None
        },
    };
    let mut clock = PhaseClock::<B> {
        device,
        pool,
        since: Instant::now(),
        on: false,
        sums: Vec::new(),
    };
    for i in 0..b.warmup + b.steps {
        let started = Instant::now();
        clock.since = started;
        clock.on = i >= b.warmup;
        let mut hook = |name: &'static str| {
            if b.profile {
                clock.mark(name)
            }
        };
        let (next, outcome) = trainer::optimizer_step(
            model,
            &mut opt,
            &teacher,
            &rows,
            &loss_cfg,
            &recipe,
            recipe.train.lr,
            device,
            &distill_train::parallel::Solo,
            &mut hook,
        )?;
        model = next;
        sync::<B>(device);
        let elapsed = started.elapsed().as_secs_f64();
        after_step();
        if i >= b.warmup {
            times.seconds.push(elapsed);
            times.losses.push(outcome.loss);
        }
    }
    if b.profile {
        times.phases = clock.means(b.steps);
    }
    Ok(times)
}

/// Synthetic rows: `batch` rows of `seq` random tokens, each one document, next-token labels
/// on every position.
pub fn random_rows(batch: usize, seq: usize, vocab: usize, rng: &mut u64) -> Vec<Row> {
    (0..batch)
        .map(|_| {
            let ids: Vec<u32> = (0..=seq).map(|_| random_below(rng, vocab) as u32).collect();
            Row {
                input_ids: ids[..seq].to_vec(),
                labels: ids[1..].iter().map(|&t| i64::from(t)).collect(),
                docs: vec![0; seq],
                keys: vec![String::new()],
            }
        })
        .collect()
}

/// A top-k teacher for `n` positions: random ids, log-probs ln(2^-(j+1)) for the j-th, so
/// the k listed carry 1 - 2^-k of the mass and the rest bucket the remainder.
pub fn synthetic_teacher<B: Backend>(
    n: usize,
    k: usize,
    vocab: usize,
    rng: &mut u64,
    device: &B::Device,
) -> TeacherTargets<B> {
    let ids: Vec<i64> = (0..n * k).map(|_| random_below(rng, vocab) as i64).collect();
    let logprobs: Vec<f32> = (0..n)
        .flat_map(|_| (0..k).map(|j| -std::f32::consts::LN_2 * (j + 1) as f32))
        .collect();
    TeacherTargets::Sparse {
        ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, k]), device),
        logprobs: Tensor::from_data(TensorData::new(logprobs, [n, k]), device),
        present: None,
    }
}

pub(crate) fn random_below(rng: &mut u64, n: usize) -> usize {
    ((distill_data::examples::uniform01(rng) * n as f64) as usize).min(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_rows_label_every_next_token() {
        let mut rng = 1;
        let rows = random_rows(2, 5, 50, &mut rng);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            assert_eq!(r.input_ids.len(), 5);
            assert_eq!(r.labels.len(), 5);
            assert_eq!(
                &r.labels[..4],
                &r.input_ids[1..].iter().map(|&t| i64::from(t)).collect::<Vec<_>>()[..]
            );
            assert!(r.input_ids.iter().all(|&t| t < 50));
        }
    }
}
