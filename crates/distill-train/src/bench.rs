//! What `distill bench` measures that lives in the trainer: the FLOP counts MFU is reported
//! against, optimizer steps timed on synthetic rows at real shapes (the same
//! [`optimizer_step`] `distill train` runs), the chunked KL + CE loss against a full-logits
//! one, and the GEMMs of the training shapes. The CLI adds generation, memory and output.
//!
//! FLOP conventions (docs/PERFORMANCE.md): N counts the parameters a token multiplies
//! through (every linear layer and the LM head, tied or not; no embedding lookup, norm or
//! bias). Attention follows PaLM / torchtitan: 4·L·H·hd·T per token forward for a row of T
//! tokens (every key counted, not the causal half), three times that for forward and
//! backward. Full fine-tuning is 6N + 12·L·H·hd·T per token; LoRA is 4N (no weight
//! gradients of the frozen base) + 6·N_lora + 12·L·H·hd·T. Recomputed forwards are not
//! counted (model FLOPs, not hardware FLOPs).

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use distill_core::Recipe;
use distill_core::recipe::BaseQuant;
use distill_models::{CausalLm, DecoderConfig, Kernels, ModelKernels};

use crate::loss::{HeadWeight, LossConfig, TeacherTargets, chunked_loss};
use crate::trainer::{self, Teacher, TrainError};
use distill_data::examples::Row;

type Ad<B> = Autodiff<B>;

/// Linear-layer parameters of one decoder layer: q, k, v, o and the SwiGLU MLP.
pub fn layer_matmul_params(c: &DecoderConfig) -> u64 {
    let (h, q, kv, i) = dims(c);
    h * q + 2 * h * kv + q * h + 3 * h * i
}

/// N: the parameters one token multiplies through, LM head included (tied or not).
pub fn matmul_params(c: &DecoderConfig) -> u64 {
    c.num_hidden_layers as u64 * layer_matmul_params(c) + (c.hidden_size * c.vocab_size) as u64
}

/// LoRA factor parameters: r·(in + out) per adapted linear layer.
pub fn lora_params(c: &DecoderConfig, r: usize, targets: &[String]) -> u64 {
    let (h, q, kv, i) = dims(c);
    let per_layer: u64 = targets
        .iter()
        .map(|t| match t.as_str() {
            "q_proj" => h + q,
            "k_proj" | "v_proj" => h + kv,
            "o_proj" => q + h,
            "gate_proj" | "up_proj" | "down_proj" => h + i,
            _ => 0,
        })
        .sum();
    c.num_hidden_layers as u64 * r as u64 * per_layer
}

/// Attention FLOPs per token in the forward pass (QK^T and AV) for rows of `seq` tokens.
pub fn attention_fwd_flops_per_token(c: &DecoderConfig, seq: usize) -> f64 {
    4.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim) as f64 * seq as f64
}

/// Model FLOPs of one training token: full fine-tuning when `lora` is None, else LoRA with
/// rank r on the named targets.
pub fn train_flops_per_token(c: &DecoderConfig, seq: usize, lora: Option<(usize, &[String])>) -> f64 {
    let n = matmul_params(c) as f64;
    let attention = 3.0 * attention_fwd_flops_per_token(c, seq);
    match lora {
        None => 6.0 * n + attention,
        Some((r, targets)) => 4.0 * n + 6.0 * lora_params(c, r, targets) as f64 + attention,
    }
}

/// Forward FLOPs of one generated or prompt token: 2N (attention left out; decoding is
/// bound by memory traffic, so this is a floor).
pub fn generate_flops_per_token(c: &DecoderConfig) -> f64 {
    2.0 * matmul_params(c) as f64
}

/// Model FLOPs utilisation: achieved TFLOP/s over the peak, when a peak is known.
pub fn mfu(tflops: f64, peak_tflops: Option<f64>) -> Option<f64> {
    peak_tflops.filter(|p| *p > 0.0).map(|p| tflops / p)
}

fn dims(c: &DecoderConfig) -> (u64, u64, u64, u64) {
    (
        c.hidden_size as u64,
        (c.num_attention_heads * c.head_dim) as u64,
        (c.num_key_value_heads * c.head_dim) as u64,
        c.intermediate_size as u64,
    )
}

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

fn random_below(rng: &mut u64, n: usize) -> usize {
    ((distill_data::examples::uniform01(rng) * n as f64) as usize).min(n.saturating_sub(1))
}

fn sync<B: Backend>(device: &B::Device) {
    // A failed sync means the device failed; the next operation reports it with context.
    let _ = B::sync(device);
}

/// Mean seconds per call of `f` over `iters` calls after `warmup` untimed ones, the device
/// synchronised before the clock starts and before it stops.
pub fn time_calls<B: Backend>(device: &B::Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    sync::<B>(device);
    let started = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync::<B>(device);
    started.elapsed().as_secs_f64() / iters.max(1) as f64
}

/// The loss over `tokens` positions at `config`'s hidden size and vocabulary: the trainer's
/// [`chunked_loss`] with `chunk` tokens per block (`chunk >= tokens` is the naive version:
/// one [tokens, V] block of logits, as a full-logits loss builds). Returns mean seconds per
/// forward + backward (to the hidden states; the head is frozen as under LoRA). `analytic`:
/// the closed-form gradient the trainer uses, else burn's autodiff through the same loss.
#[allow(clippy::too_many_arguments)]
pub fn bench_loss<B: Kernels>(
    config: &DecoderConfig,
    tokens: usize,
    chunk: usize,
    top_k: usize,
    analytic: bool,
    warmup: usize,
    iters: usize,
    device: &B::Device,
    after_call: &mut dyn FnMut(),
) -> f64
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let (c, v) = (config.hidden_size, config.vocab_size);
    <Ad<B> as Backend>::seed(device, 7);
    let hidden = Tensor::<B, 2>::random([tokens, c], Distribution::Normal(0.0, 1.0), device);
    let weight = Tensor::<B, 2>::random([c, v], Distribution::Normal(0.0, 0.02), device);
    let mut rng = 11;
    let labels: Vec<i64> = (0..tokens).map(|_| random_below(&mut rng, v) as i64).collect();
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [tokens]), device);
    let teacher = if top_k > 0 {
        synthetic_teacher::<B>(tokens, top_k, v, &mut rng, device)
    } else {
        TeacherTargets::None
    };
    let cfg = LossConfig {
        kd_ratio: if top_k > 0 { 0.5 } else { 0.0 },
        analytic_grad: analytic,
        ..LossConfig::from_recipe(&Default::default(), Some(v))
    };
    time_calls::<B>(device, warmup, iters, || {
        let out = chunked_loss::<Ad<B>>(
            hidden.clone(),
            HeadWeight::Cv(weight.clone()),
            labels.clone(),
            &teacher,
            &cfg,
            chunk,
            false,
            1.0 / tokens as f64,
        );
        drop(out);
        after_call();
    })
}

/// FLOPs of one [`bench_loss`] call: the head's logits and the gradient to the hidden states.
pub fn loss_flops(config: &DecoderConfig, tokens: usize) -> f64 {
    4.0 * (tokens * config.hidden_size) as f64 * config.vocab_size as f64
}

/// One GEMM of the training step: x [m, k] @ w [k, n].
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    pub name: String,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Gemm {
    pub fn new(name: impl Into<String>, m: usize, k: usize, n: usize) -> Self {
        Gemm {
            name: name.into(),
            m,
            k,
            n,
        }
    }

    /// 2·m·k·n: the forward product; the backward (dX and dW) is twice this.
    pub fn fwd_flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The GEMMs of one training step at `tokens` tokens: every projection, the LM head as the
/// chunked loss runs it (`chunk` tokens), and the LoRA factors at rank `r`.
pub fn training_gemms(c: &DecoderConfig, tokens: usize, chunk: usize, r: usize) -> Vec<Gemm> {
    let (h, q, kv, i) = {
        let (h, q, kv, i) = dims(c);
        (h as usize, q as usize, kv as usize, i as usize)
    };
    let mut gemms = vec![
        Gemm::new("q_proj", tokens, h, q),
        Gemm::new("k_proj/v_proj", tokens, h, kv),
        Gemm::new("o_proj", tokens, q, h),
        Gemm::new("gate_proj/up_proj", tokens, h, i),
        Gemm::new("down_proj", tokens, i, h),
        Gemm::new(
            format!("lm_head (chunk {})", chunk.min(tokens)),
            chunk.min(tokens),
            h,
            c.vocab_size,
        ),
    ];
    if r > 0 {
        gemms.push(Gemm::new(format!("lora_A r{r} (gate/up)"), tokens, h, r));
        gemms.push(Gemm::new(format!("lora_B r{r} (gate/up)"), tokens, r, i));
        gemms.push(Gemm::new(format!("lora_A r{r} (down)"), tokens, i, r));
    }
    gemms
}

/// Mean seconds of the forward product alone (inner backend, as the no-graph forward runs
/// it) and of forward + backward (autodiff, gradients of x and w from a ones seed, as a
/// training step runs it), both through [`ModelKernels::linear`](distill_kernels::ModelKernels::linear).
pub fn bench_gemm<B: Kernels>(g: &Gemm, warmup: usize, iters: usize, device: &B::Device) -> (f64, f64)
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    let x = Tensor::<B, 2>::random([g.m, g.k], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([g.k, g.n], Distribution::Normal(0.0, 0.02), device);
    let fwd = time_calls::<B>(device, warmup, iters, || {
        drop(<B as ModelKernels>::linear(x.clone(), w.clone(), None));
    });
    let fwd_bwd = time_calls::<B>(device, warmup, iters, || {
        let xa = Tensor::<Ad<B>, 2>::from_inner(x.clone()).require_grad();
        let wa = Tensor::<Ad<B>, 2>::from_inner(w.clone()).require_grad();
        let grads = <Ad<B> as ModelKernels>::linear(xa.clone(), wa.clone(), None).backward();
        drop((xa.grad(&grads), wa.grad(&grads)));
    });
    (fwd, fwd_bwd)
}

#[cfg(test)]
mod tests {
    use distill_core::recipe::LoraSection;
    use distill_hf::config::RopeScaling;
    use distill_models::Architecture;

    use super::*;

    /// hidden 4, 2 layers, 2 heads of 2, 1 KV head, MLP 8, vocab 10.
    fn toy() -> DecoderConfig {
        DecoderConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 10,
            hidden_size: 4,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 2,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::None,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: true,
            torch_dtype: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    fn all_targets() -> Vec<String> {
        LoraSection::default().targets
    }

    #[test]
    fn flop_counts_match_the_closed_forms_by_hand() {
        let c = toy();
        // q 4x4=16, k and v 4x2=8 each, o 4x4=16, gate/up/down 4x8=32 each: 144 per layer.
        assert_eq!(layer_matmul_params(&c), 144);
        // 2 layers + head 4x10.
        assert_eq!(matmul_params(&c), 328);
        // r=1: q 4+4, k 4+2, v 4+2, o 4+4, gate 4+8, up 4+8, down 8+4 = 64 per layer.
        assert_eq!(lora_params(&c, 1, &all_targets()), 128);
        assert_eq!(lora_params(&c, 16, &["q_proj".to_string()]), 2 * 16 * 8);
        // 4 * L * H * hd * T = 4 * 2 * 2 * 2 * 3.
        assert_eq!(attention_fwd_flops_per_token(&c, 3), 96.0);
        // Full: 6N + 12 L H hd T = 1968 + 288.
        assert_eq!(train_flops_per_token(&c, 3, None), 2256.0);
        // LoRA: 4N + 6 N_lora + 12 L H hd T = 1312 + 768 + 288.
        let targets = all_targets();
        assert_eq!(train_flops_per_token(&c, 3, Some((1, &targets))), 2368.0);
        assert_eq!(generate_flops_per_token(&c), 656.0);
        assert_eq!(loss_flops(&c, 5), 4.0 * 5.0 * 4.0 * 10.0);
        assert_eq!(Gemm::new("x", 2, 3, 5).fwd_flops(), 60.0);
    }

    #[test]
    fn qwen_7b_counts_agree_with_its_published_size() {
        // Qwen2.5-7B: 7.62B parameters, of which 0.545B embeddings and 0.545B LM head; the
        // matmul count leaves out the embeddings, norms and q/k/v biases.
        let c = DecoderConfig {
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            tie_word_embeddings: false,
            ..toy()
        };
        let n = matmul_params(&c) as f64;
        assert!((n / 1e9 - 7.07).abs() < 0.01, "{n}");
        // At 2048 tokens per row attention adds 12 * 28 * 3584 * 2048 per token.
        let full = train_flops_per_token(&c, 2048, None);
        assert_eq!(full, 6.0 * n + 12.0 * 28.0 * 3584.0 * 2048.0);
    }

    #[test]
    fn mfu_needs_a_positive_peak() {
        assert_eq!(mfu(100.0, Some(400.0)), Some(0.25));
        assert_eq!(mfu(100.0, None), None);
        assert_eq!(mfu(100.0, Some(0.0)), None);
    }

    #[test]
    fn training_gemms_cover_projections_head_and_adapters() {
        let c = toy();
        let g = training_gemms(&c, 16, 8, 2);
        assert_eq!(g[0], Gemm::new("q_proj", 16, 4, 4));
        assert_eq!(g[5], Gemm::new("lm_head (chunk 8)", 8, 4, 10));
        assert_eq!(g.len(), 9);
        assert_eq!(training_gemms(&c, 16, 8, 0).len(), 6);
    }

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
