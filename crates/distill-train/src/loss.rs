//! The distillation loss: total = kd_ratio * D(teacher, student) + (1 - kd_ratio) * CE, per
//! token, in f32. D is forward KL, reverse KL or TRL's generalized JSD(beta), on the full
//! vocabulary (a local teacher's logits) or on the teacher's top-k (API soft labels).
//!
//! Top-k teachers leave mass outside the k ids unknown. `MissingMass::OtherBucket` adds one
//! category holding the rest on both sides (the teacher's 1 - sum p_k, the student's
//! 1 - sum q_k); `Renormalize` compares both distributions restricted to the k ids and
//! renormalised. Temperature T divides the student's logits and the teacher's log-probs
//! (the teacher's rest mass is raised to 1/T alike); the divergence is scaled by T^2 so
//! gradients keep their size across temperatures (Hinton et al.).
//!
//! [`chunked_loss`] differentiates with burn's autodiff, except for the recipe's default case
//! (CE alone, or CE + forward KL on a top-k teacher with the rest bucket), whose gradient with
//! respect to the logits it writes down in closed form ([`analytic_chunk`]): about half the
//! passes over each [chunk, V] block of logits, and no graph.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use distill_core::recipe::{KlKind, LossSection, MissingMass};

/// Logits of vocabulary rows past the tokenizer (padding rows of the embedding matrix) are
/// set to this: finite, so 0 * log(q) stays 0 instead of NaN.
const MASKED_LOGIT: f32 = -1e9;
/// Floor for probabilities that enter a log (the student's rest mass).
const EPS: f32 = 1e-20;

/// The teacher's view of the same N tokens.
#[derive(Debug, Clone)]
pub enum TeacherTargets<B: Backend> {
    /// No teacher distribution: CE only.
    None,
    /// Full-vocabulary logits [N, V] from a local teacher (no gradient).
    Dense(Tensor<B, 2>),
    /// Top-k ids [N, k] and log-probs [N, k] at temperature 1 (any float dtype; the loss
    /// works in f32, and `soft` builds them in f32). An entry with log-prob -inf
    /// is absent (fewer than k alternatives stored); its id must still be a valid index.
    /// `present` [N] is 1 where the teacher has a distribution and 0 where it has none (KD
    /// skips those positions: they train on CE alone); None means present everywhere.
    Sparse {
        ids: Tensor<B, 2, Int>,
        logprobs: Tensor<B, 2>,
        present: Option<Tensor<B, 1>>,
    },
    /// The teacher's log-probability [N] (temperature 1) of the label at each position, the
    /// label being a token the student sampled: the divergence is then the sampled-token
    /// estimate of the reverse KL, log q(x) - log p(x), whose gradient is that estimate times
    /// the gradient of log q(x) (on-policy distillation with any teacher that can score text).
    Sampled(Tensor<B, 1>),
}

impl<B: Backend> TeacherTargets<B> {
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        match self {
            TeacherTargets::None => TeacherTargets::None,
            TeacherTargets::Dense(t) => TeacherTargets::Dense(t.clone().narrow(0, start, len)),
            TeacherTargets::Sparse {
                ids,
                logprobs,
                present,
            } => TeacherTargets::Sparse {
                ids: ids.clone().narrow(0, start, len),
                logprobs: logprobs.clone().narrow(0, start, len),
                present: present.as_ref().map(|p| p.clone().narrow(0, start, len)),
            },
            TeacherTargets::Sampled(lp) => TeacherTargets::Sampled(lp.clone().narrow(0, start, len)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub kd_ratio: f64,
    pub kind: KlKind,
    pub beta: f64,
    pub temperature: f64,
    pub missing_mass: MissingMass,
    /// Real vocabulary size; logits at or beyond it are masked out.
    pub vocab_limit: Option<usize>,
    /// Let [`chunked_loss`] use the closed-form gradient where it applies (always, except to
    /// compare it with autodiff: tests, `distill bench loss`).
    pub analytic_grad: bool,
}

impl LossConfig {
    pub fn from_recipe(s: &LossSection, vocab_limit: Option<usize>) -> Self {
        LossConfig {
            kd_ratio: s.kd_ratio,
            kind: s.kind,
            beta: s.beta,
            temperature: s.temperature,
            missing_mass: s.missing_mass,
            vocab_limit,
            analytic_grad: analytic_grad_enabled(),
        }
    }
}

/// `DISTILL_LOSS_GRAD=autodiff` differentiates every loss through burn's autodiff, to check
/// the closed form against it on a real run; anything else (or unset) keeps the closed form.
fn analytic_grad_enabled() -> bool {
    std::env::var("DISTILL_LOSS_GRAD").map_or(true, |v| v != "autodiff")
}

/// Per-token sums over a set of tokens; divide by the token count for means.
#[derive(Debug, Clone)]
pub struct LossSums<B: Backend> {
    /// kd_ratio * kl + (1 - kd_ratio) * ce, summed: the quantity to differentiate.
    pub total: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
    pub kl: Tensor<B, 1>,
}

/// Loss sums for logits [N, V] against labels [N] and the teacher.
pub fn token_loss<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    teacher: &TeacherTargets<B>,
    cfg: &LossConfig,
) -> LossSums<B> {
    let logits = mask_padding(logits.cast(DType::F32), cfg.vocab_limit); // [N, V]
    let log_q = log_softmax(logits.clone(), 1);
    let log_q_label = log_q
        .clone()
        .gather(1, labels.unsqueeze_dim(1))
        .squeeze_dim::<1>(1); // [N]
    let ce = log_q_label.clone().neg().sum(); // [1]
    let kl = match teacher {
        TeacherTargets::None => ce.zeros_like(),
        _ if cfg.kd_ratio == 0.0 => ce.zeros_like(),
        TeacherTargets::Sampled(log_p) => sampled_reverse_kl(log_q_label, log_p.clone().cast(DType::F32)),
        _ => {
            let t = cfg.temperature;
            let log_q_t = if t == 1.0 {
                log_q
            } else {
                log_softmax(logits.div_scalar(t), 1)
            };
            let (log_p, log_q) = paired_distributions(log_q_t, teacher, cfg);
            let per_token = divergence(log_p, log_q, cfg.kind, cfg.beta); // [N]
            let per_token = match teacher {
                TeacherTargets::Sparse {
                    present: Some(present),
                    ..
                // Cast: `present` may be the backend's default dtype (bf16 on CUDA), and a
                // mixed-dtype product on burn-cuda reads one buffer as the other's type.
                } => per_token * present.clone().cast(DType::F32),
                _ => per_token,
            };
            per_token.sum().mul_scalar(t * t)
        }
    };
    let total = kl.clone().mul_scalar(cfg.kd_ratio) + ce.clone().mul_scalar(1.0 - cfg.kd_ratio);
    LossSums { total, ce, kl }
}

impl<B: Backend> TeacherTargets<B> {
    /// A full-vocabulary teacher reduced to what the sampled-token estimator reads: its
    /// log-probability (temperature 1) of each label. Dense logits [N, V], labels [N].
    pub fn at_labels(self, labels: Tensor<B, 1, Int>, vocab_limit: Option<usize>) -> Self {
        match self {
            TeacherTargets::Dense(z) => {
                let log_p = log_softmax(mask_padding(z.cast(DType::F32), vocab_limit), 1); // [N, V]
                TeacherTargets::Sampled(log_p.gather(1, labels.unsqueeze_dim(1)).squeeze_dim(1))
            }
            other => other,
        }
    }
}

/// The sampled-token reverse KL, summed over positions, as a surrogate whose value is the
/// estimate sum(log q(x) - log p(x)) and whose gradient is sum((log q(x) - log p(x)) * grad
/// log q(x)): the score-function gradient of E_q[log q - log p] with each token's own term as
/// its reward (no value function, no credit to earlier tokens: Thinking Machines' on-policy
/// distillation). E_q[grad log q] = 0 drops the derivative of the estimate itself.
/// log_q, log_p: [N] at the sampled tokens.
fn sampled_reverse_kl<B: Backend>(log_q: Tensor<B, 1>, log_p: Tensor<B, 1>) -> Tensor<B, 1> {
    let estimate = log_q.clone().detach() - log_p; // [N]
    let weighted = estimate.clone() * log_q;
    (weighted.clone() - weighted.detach() + estimate).sum()
}

fn mask_padding<B: Backend>(logits: Tensor<B, 2>, vocab_limit: Option<usize>) -> Tensor<B, 2> {
    let [n, v] = logits.dims();
    match vocab_limit {
        Some(limit) if limit < v => {
            let keep = logits.clone().narrow(1, 0, limit);
            let pad = Tensor::full([n, v - limit], MASKED_LOGIT, (&logits.device(), logits.dtype()));
            Tensor::cat(vec![keep, pad], 1)
        }
        _ => logits,
    }
}

/// The teacher's and the student's log-distributions over the same categories:
/// the vocabulary (dense), or the k ids (+ the rest bucket) for a sparse teacher.
/// log_q: the student's tempered log-softmax [N, V]. Returns ([N, K], [N, K]).
fn paired_distributions<B: Backend>(
    log_q: Tensor<B, 2>,
    teacher: &TeacherTargets<B>,
    cfg: &LossConfig,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let t = cfg.temperature;
    match teacher {
        TeacherTargets::None | TeacherTargets::Sampled(_) => unreachable!("no distribution to pair"),
        TeacherTargets::Dense(z) => {
            let z = mask_padding(z.clone().cast(DType::F32), cfg.vocab_limit);
            (log_softmax(z.div_scalar(t), 1), log_q)
        }
        TeacherTargets::Sparse { ids, logprobs, .. } => {
            // Absent entries (-inf) become MASKED_LOGIT on both sides: zero probability,
            // finite arithmetic, and no share of either rest bucket.
            let absent = logprobs.clone().lower_equal_elem(-1e30); // [N, k]
            let logprobs = logprobs
                .clone()
                .cast(DType::F32)
                .mask_fill(absent.clone(), MASKED_LOGIT);
            let lp = logprobs.clone().div_scalar(t); // [N, k]
            let lq = log_q.gather(1, ids.clone()).mask_fill(absent, MASKED_LOGIT); // [N, k]
            match cfg.missing_mass {
                MissingMass::Renormalize => (renormalize(lp), renormalize(lq)),
                MissingMass::OtherBucket => {
                    // Teacher rest at T=1 is 1 - sum exp(logprobs); tempering raises it to 1/T.
                    let rest_p = logprobs
                        .clone()
                        .cast(DType::F32)
                        .exp()
                        .sum_dim(1)
                        .neg()
                        .add_scalar(1.0)
                        .clamp_min(EPS)
                        .log()
                        .div_scalar(t); // [N, 1]
                    let log_p = renormalize(Tensor::cat(vec![lp, rest_p], 1));
                    let rest_q = lq
                        .clone()
                        .exp()
                        .sum_dim(1)
                        .neg()
                        .add_scalar(1.0)
                        .clamp_min(EPS)
                        .log();
                    (log_p, Tensor::cat(vec![lq, rest_q], 1))
                }
            }
        }
    }
}

/// log-weights [N, K] -> log-probabilities summing to 1 per row.
fn renormalize<B: Backend>(log_w: Tensor<B, 2>) -> Tensor<B, 2> {
    log_softmax(log_w, 1)
}

/// Per-row divergence [N] between teacher log_p and student log_q, each [N, K].
/// kind Jsd follows TRL's generalized_jsd_loss: beta 0 is forward KL, 1 reverse KL.
pub fn divergence<B: Backend>(
    log_p: Tensor<B, 2>,
    log_q: Tensor<B, 2>,
    kind: KlKind,
    beta: f64,
) -> Tensor<B, 1> {
    match kind {
        KlKind::Forward => kl(log_p, log_q),
        KlKind::Reverse => kl(log_q, log_p),
        KlKind::Jsd if beta == 0.0 => kl(log_p, log_q),
        KlKind::Jsd if beta == 1.0 => kl(log_q, log_p),
        KlKind::Jsd => {
            // log m = logsumexp(log q + log(1 - beta), log p + log(beta))
            let a = log_q.clone().add_scalar((1.0 - beta).ln());
            let b = log_p.clone().add_scalar(beta.ln());
            let max = a.clone().max_pair(b.clone());
            let log_m = max.clone() + ((a - max.clone()).exp() + (b - max).exp()).log();
            kl(log_p, log_m.clone()).mul_scalar(beta) + kl(log_q, log_m).mul_scalar(1.0 - beta)
        }
    }
}

/// KL(a || b) per row from log-probabilities [N, K] -> [N].
fn kl<B: Backend>(log_a: Tensor<B, 2>, log_b: Tensor<B, 2>) -> Tensor<B, 1> {
    (log_a.clone().exp() * (log_a - log_b)).sum_dim(1).squeeze_dim(1)
}

/// Loss sums as numbers, and the gradients of `scale * total` for the head's inputs.
#[derive(Debug)]
pub struct ChunkedLoss<B: Backend> {
    pub total: f64,
    pub ce: f64,
    pub kl: f64,
    /// d(scale * total)/d hidden, [N, C].
    pub grad_hidden: Tensor<B, 2>,
    /// d(scale * total)/d weight, in the [`HeadWeight`]'s layout, when asked for.
    pub grad_weight: Option<Tensor<B, 2>>,
}

/// The output projection as the model stores it. Its gradient comes back in the same layout:
/// for tied embeddings a [C, V] gradient had to be copied transposed into the embedding's
/// [V, C] (0.87 GiB of f32 at 1.5B, beside the loss's peak).
#[derive(Clone, Debug)]
pub enum HeadWeight<B: Backend> {
    /// [C, V]: an lm_head in burn's layout.
    Cv(Tensor<B, 2>),
    /// [V, C]: the tied input embeddings.
    Vc(Tensor<B, 2>),
}

impl<B: Backend> HeadWeight<B> {
    /// The weight as stored, either layout.
    fn stored(&self) -> &Tensor<B, 2> {
        match self {
            HeadWeight::Cv(w) | HeadWeight::Vc(w) => w,
        }
    }

    fn map<B2: Backend>(self, f: impl FnOnce(Tensor<B, 2>) -> Tensor<B2, 2>) -> HeadWeight<B2> {
        match self {
            HeadWeight::Cv(w) => HeadWeight::Cv(f(w)),
            HeadWeight::Vc(w) => HeadWeight::Vc(f(w)),
        }
    }

    /// [C, V], a view.
    fn cv(self) -> Tensor<B, 2> {
        match self {
            HeadWeight::Cv(w) => w,
            HeadWeight::Vc(w) => w.transpose(),
        }
    }
}

/// Runs the output projection and the loss `chunk` tokens at a time, each chunk with its own
/// backward pass, so only a [chunk, V] block of logits (and its gradient) ever exists. The
/// caller feeds `grad_hidden` back into the model's graph (see `trainer`).
///
/// hidden: [N, C] and the weight on the inner backend; labels [N]; teacher on the inner
/// backend; `scale` multiplies the loss before differentiation (1 / tokens in the step).
#[allow(clippy::too_many_arguments)]
pub fn chunked_loss<AD>(
    hidden: Tensor<AD::InnerBackend, 2>,
    weight: HeadWeight<AD::InnerBackend>,
    labels: Tensor<AD::InnerBackend, 1, Int>,
    teacher: &TeacherTargets<AD::InnerBackend>,
    cfg: &LossConfig,
    chunk: usize,
    want_weight_grad: bool,
    scale: f64,
) -> ChunkedLoss<AD::InnerBackend>
where
    AD: burn::tensor::backend::AutodiffBackend + distill_models::Kernels,
    AD::InnerBackend: distill_models::Kernels,
{
    let [n, c] = hidden.dims();
    let device = hidden.device();
    let dtype = hidden.dtype();
    // The head weight in the activations' dtype once, not once per chunk: the tied head's f32
    // master copy is [C, 151936], and its cast took 4.3 ms a chunk on the H100.
    let w_dtype = weight.stored().dtype();
    let weight = weight.map(|w| distill_kernels::cast_to(w, dtype));
    let analytic = has_analytic_grad(teacher, cfg);
    // (total, ce, kl) summed on the device, read once at the end: a read per chunk would
    // stall the GPU queue between chunks.
    let mut sums: Option<Tensor<AD::InnerBackend, 1>> = None; // [3]
    // dL/dW summed over the chunks in f32, cast to the weight's dtype once at the end.
    let mut grad_weight: Option<Tensor<AD::InnerBackend, 2>> = None;
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let h = hidden.clone().narrow(0, start, len); // [len, C]
        let labels_chunk = labels.clone().narrow(0, start, len);
        let teacher_chunk = teacher.narrow(start, len);
        let want_w = want_weight_grad.then(|| grad_weight.take());
        let (chunk_sums, grad_h, grad_w) = if analytic {
            analytic_head_chunk(
                h,
                weight.clone(),
                labels_chunk,
                &teacher_chunk,
                cfg,
                want_w,
                scale,
            )
        } else {
            autodiff_head_chunk::<AD>(
                h,
                weight.clone(),
                labels_chunk,
                &teacher_chunk,
                cfg,
                want_w,
                scale,
            )
        };
        sums = Some(match sums.take() {
            Some(acc) => acc + chunk_sums,
            None => chunk_sums,
        });
        grad_chunks.push(grad_h);
        grad_weight = grad_w;
        start += len;
    }
    let grad_weight = grad_weight.map(|g| distill_kernels::cast_to(g, w_dtype));
    let (total, ce, kl) = match sums {
        Some(s) => {
            let v: Vec<f64> = s
                .into_data()
                .convert::<f64>()
                .into_vec()
                .expect("loss sums are floats");
            (v[0], v[1], v[2])
        }
        None => (0.0, 0.0, 0.0),
    };
    // GPU backends cannot launch kernels over zero elements: build the empty case on the
    // host side of the API (no kernel) rather than with zeros().
    let grad_hidden = if grad_chunks.is_empty() {
        Tensor::from_data(TensorData::new(Vec::<f32>::new(), [0, c]), (&device, dtype))
    } else {
        Tensor::cat(grad_chunks, 0)
    };
    ChunkedLoss {
        total,
        ce,
        kl,
        grad_hidden,
        grad_weight,
    }
}

/// One chunk's sums [3] (total, ce, kl), d(scale * total)/d h [len, C] and, when asked,
/// d(scale * total)/d weight (in its layout) in f32 added to the earlier chunks'.
type ChunkOutput<B> = (Tensor<B, 1>, Tensor<B, 2>, Option<Tensor<B, 2>>);

/// Whether a chunk computes dL/dW: None, no; Some(earlier chunks' sum in f32, if any).
type WeightGrad<B> = Option<Option<Tensor<B, 2>>>;

/// One chunk of [`chunked_loss`] through [`token_loss`] and burn's autodiff.
fn autodiff_head_chunk<AD>(
    h: Tensor<AD::InnerBackend, 2>,
    weight: HeadWeight<AD::InnerBackend>,
    labels: Tensor<AD::InnerBackend, 1, Int>,
    teacher: &TeacherTargets<AD::InnerBackend>,
    cfg: &LossConfig,
    want_weight_grad: WeightGrad<AD::InnerBackend>,
    scale: f64,
) -> ChunkOutput<AD::InnerBackend>
where
    AD: burn::tensor::backend::AutodiffBackend + distill_models::Kernels,
{
    let h = Tensor::<AD, 2>::from_inner(h).require_grad();
    // The leaf in the stored layout, so its gradient comes back in it.
    let mut w = weight.map(Tensor::<AD, 2>::from_inner);
    if want_weight_grad.is_some() {
        w = w.map(Tensor::require_grad);
    }
    let leaf = w.stored().clone();
    let logits = <AD as distill_models::ModelKernels>::linear(h.clone(), w.cv(), None);
    let sums = token_loss(logits, Tensor::from_inner(labels), &lift::<AD>(teacher), cfg);
    let values = Tensor::cat(
        vec![sums.total.clone().inner(), sums.ce.inner(), sums.kl.inner()],
        0,
    );
    let grads = sums.total.mul_scalar(scale).backward();
    let grad_h = h.grad(&grads).expect("hidden chunk is a leaf with grad");
    let grad_w = want_weight_grad.map(|acc| {
        let g = leaf
            .grad(&grads)
            .expect("weight is a leaf with grad")
            .cast(DType::F32);
        match acc {
            Some(acc) => acc + g,
            None => g,
        }
    });
    (values, grad_h, grad_w)
}

/// The same as [`autodiff_head_chunk`] with the closed-form gradient of [`analytic_chunk`]:
/// logits = h @ W, dL/dh = G @ Wᵀ, dL/dW = hᵀ @ G (or its transpose Gᵀ @ h for a [V, C]
/// weight; in f32), each one GEMM. h: [len, C] and the weight in one dtype ([`chunked_loss`]
/// casts the weight once per step).
fn analytic_head_chunk<B: distill_models::Kernels>(
    h: Tensor<B, 2>,
    weight: HeadWeight<B>,
    labels: Tensor<B, 1, Int>,
    teacher: &TeacherTargets<B>,
    cfg: &LossConfig,
    want_weight_grad: WeightGrad<B>,
    scale: f64,
) -> ChunkOutput<B> {
    let vc = matches!(weight, HeadWeight::Vc(_));
    let w = weight.cv(); // [C, V]
    let logits = <B as distill_models::ModelKernels>::linear(h.clone(), w.clone(), None); // [len, V]
    let (values, g) = analytic_chunk(logits, labels, teacher, cfg, scale, h.dtype().into()); // [len, V]
    let grad_h = distill_kernels::gemm(g.clone(), w.transpose()); // [len, C]
    // dL/dW straight from the GEMM's f32 accumulator, added there to the earlier chunks' sum:
    // a bf16 result was rounded, then cast, once per chunk, and a separate sum kept a second
    // [C, V] f32 buffer (0.87 GiB at 1.5B's tied head) through the loss, its peak.
    let grad_w = want_weight_grad.map(|acc| {
        let ([len, c], v) = (h.dims(), g.dims()[1]);
        let h = h.reshape([1, 1, len, c]);
        let g = g.reshape([1, 1, len, v]);
        // [C, len] @ [len, V], or [V, len] @ [len, C]: the transposed operand is a view.
        let (a, b, dims) = if vc {
            (g.swap_dims(2, 3), h, [v, c])
        } else {
            (h.swap_dims(2, 3), g, [c, v])
        };
        let sum: Tensor<B, 4> = match acc {
            Some(acc) => distill_kernels::bmm_accumulate(acc.reshape([1, 1, dims[0], dims[1]]), a, b),
            None => distill_kernels::bmm(a, b, FloatDType::F32),
        };
        sum.reshape(dims)
    }); // f32, the weight's layout
    (values, grad_h, grad_w)
}

/// Whether [`analytic_chunk`] covers `teacher` under `cfg`: CE alone, or CE + forward KL
/// (JSD with beta 0 is forward KL) on a top-k teacher with the rest bucket, at any temperature.
fn has_analytic_grad<B: Backend>(teacher: &TeacherTargets<B>, cfg: &LossConfig) -> bool {
    let forward = cfg.kind == KlKind::Forward || (cfg.kind == KlKind::Jsd && cfg.beta == 0.0);
    cfg.analytic_grad
        && match teacher {
            TeacherTargets::None => true,
            _ if cfg.kd_ratio == 0.0 => true,
            TeacherTargets::Sparse { .. } => forward && cfg.missing_mass == MissingMass::OtherBucket,
            TeacherTargets::Dense(_) | TeacherTargets::Sampled(_) => false,
        }
}

/// Sums [3] (total, ce, kl) over logits [N, V] and d(scale * total)/d logits [N, V] in f32,
/// in closed form: what [`token_loss`] and its backward compute, for the cases of
/// [`has_analytic_grad`].
///
/// With q = softmax(z) and y the label, d CE/dz = q - onehot(y). With q_T = softmax(z / T),
/// the teacher's k probabilities p_j and rest p_r (tempered, renormalised as in
/// [`token_loss`]), Q = sum of q_T over the k ids and q_r = 1 - Q, the bucketed forward KL
/// KL = sum_j p_j log(p_j / q_T,j) + p_r log(p_r / q_r) has
///     d (T^2 KL)/dz_i = T (c q_T,i + [i in k] (q_T,i - p_i - c q_T,i)),  c = P - p_r Q / q_r,
/// with P = 1 - p_r. Where q_r is clamped at EPS the rest term is constant (as clamp_min's
/// gradient is zero there): c = P and the bracket becomes -p_i.
fn analytic_chunk<B: distill_models::Kernels>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    teacher: &TeacherTargets<B>,
    cfg: &LossConfig,
    scale: f64,
    grad_dtype: FloatDType,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [n, v] = logits.dims();
    let limit = cfg.vocab_limit.map_or(v, |l| l.min(v));
    let device = logits.device();
    let labels = labels.unsqueeze_dim::<2>(1); // [N, 1]
    let ce_w = 1.0 - cfg.kd_ratio;
    let sparse = match teacher {
        TeacherTargets::Sparse {
            ids,
            logprobs,
            present,
        } if cfg.kd_ratio != 0.0 => Some((ids, logprobs, present)),
        _ => None,
    };
    let t = if sparse.is_some() { cfg.temperature } else { 1.0 };
    // The two passes over [N, V]: row statistics now, the gradient at the end.
    let (max, sum, sum_t) = B::softmax_stats(logits.clone(), t, limit); // [N, 1] f32 each
    let lse = max.clone() + sum.clone().log();
    let ce = (lse - logits_at(&logits, labels.clone(), limit)).sum(); // [1]
    // Explicitly f32: a backend's default float type may be bf16 (Cuda<bf16>).
    let label_grad = Tensor::<B, 2>::full([n, 1], -ce_w * scale, (&device, DType::F32)); // [N, 1]

    let Some((ids, logprobs, present)) = sparse else {
        // CE alone (no teacher, or kd_ratio 0).
        let a = sum.recip().mul_scalar(ce_w * scale);
        let grad = B::softmax_grad(logits, max, a, None, 1.0, limit, labels, label_grad, grad_dtype);
        let values = Tensor::cat(vec![ce.clone().mul_scalar(ce_w), ce.clone(), ce.zeros_like()], 0);
        return (values, grad);
    };

    // The teacher: k tempered log-probs and the rest, renormalised ([N, k], [N, 1]).
    let absent = logprobs.clone().lower_equal_elem(-1e30); // [N, k]
    let lp = logprobs
        .clone()
        .cast(DType::F32)
        .mask_fill(absent.clone(), MASKED_LOGIT);
    let rest = lp
        .clone()
        .exp()
        .sum_dim(1)
        .neg()
        .add_scalar(1.0)
        .clamp_min(EPS)
        .log(); // [N, 1]
    let k = lp.dims()[1];
    let log_p = log_softmax(Tensor::cat(vec![lp.div_scalar(t), rest.div_scalar(t)], 1), 1); // [N, k+1]
    let log_p_k = log_p.clone().narrow(1, 0, k);
    let log_p_rest = log_p.narrow(1, k, 1);
    let p_k = log_p_k.clone().exp(); // absent entries: 0
    let p_rest = log_p_rest.clone().exp();

    // The student at temperature T.
    let lse_t = max.clone().div_scalar(t) + sum_t.clone().log(); // [N, 1]
    let lq_k = (logits_at(&logits, ids.clone(), limit).div_scalar(t) - lse_t).mask_fill(absent, MASKED_LOGIT); // [N, k]
    let q_k = lq_k.clone().exp(); // absent entries: 0
    let big_q = q_k.clone().sum_dim(1); // [N, 1]
    let r = big_q.clone().neg().add_scalar(1.0);
    let unclamped = r.clone().greater_elem(EPS); // [N, 1]
    let q_rest = r.clamp_min(EPS);
    let kl_rows =
        (p_k.clone() * (log_p_k - lq_k)).sum_dim(1) + p_rest.clone() * (log_p_rest - q_rest.clone().log()); // [N, 1]
    let present = present.clone().map(|p| p.cast(DType::F32).unsqueeze_dim::<2>(1)); // [N, 1]
    let kl_rows = match &present {
        Some(p) => kl_rows * p.clone(),
        None => kl_rows,
    };
    let kl = kl_rows.sum().mul_scalar(t * t); // [1]

    let big_p = p_rest.clone().neg().add_scalar(1.0); // [N, 1]
    let c_free = big_p.clone() - p_rest * big_q / q_rest;
    let c = big_p.mask_where(unclamped.clone(), c_free); // [N, 1]
    let d = c
        .clone()
        .neg()
        .add_scalar(1.0)
        .mask_fill(unclamped.bool_not(), 0.0); // [N, 1]
    // Per-row weight of the KL gradient: kd_ratio * T * scale, times present.
    let w_kd = match &present {
        Some(p) => p.clone().mul_scalar(cfg.kd_ratio * t * scale),
        None => Tensor::full([n, 1], cfg.kd_ratio * t * scale, (&device, DType::F32)),
    };
    // Dense: a e + b e_T with e = exp(z - max), e_T = exp((z - max) / T); one term at T = 1.
    let (a, b) = if t == 1.0 {
        ((w_kd.clone() * c).add_scalar(ce_w * scale) / sum, None)
    } else {
        (
            sum.recip().mul_scalar(ce_w * scale),
            Some(w_kd.clone() * c / sum_t),
        )
    };
    let sparse = w_kd * (d * q_k - p_k); // [N, k]
    let grad = B::softmax_grad(
        logits,
        max,
        a,
        b,
        t,
        limit,
        Tensor::cat(vec![ids.clone(), labels], 1), // [N, k+1]
        Tensor::cat(vec![sparse, label_grad], 1),
        grad_dtype,
    );
    let total = kl.clone().mul_scalar(cfg.kd_ratio) + ce.clone().mul_scalar(ce_w);
    (Tensor::cat(vec![total, ce, kl], 0), grad)
}

/// The logits at columns `ids` [N, M] in f32; columns at or past `limit` (vocabulary
/// padding) read as [`MASKED_LOGIT`], as if the padding were masked first.
fn logits_at<B: Backend>(logits: &Tensor<B, 2>, ids: Tensor<B, 2, Int>, limit: usize) -> Tensor<B, 2> {
    let padding = ids.clone().greater_equal_elem(limit as i64);
    logits
        .clone()
        .gather(1, ids)
        .cast(DType::F32)
        .mask_fill(padding, MASKED_LOGIT)
}

/// Teacher targets moved onto the autodiff backend as constants.
fn lift<AD: burn::tensor::backend::AutodiffBackend>(
    t: &TeacherTargets<AD::InnerBackend>,
) -> TeacherTargets<AD> {
    match t {
        TeacherTargets::None => TeacherTargets::None,
        TeacherTargets::Dense(z) => TeacherTargets::Dense(Tensor::from_inner(z.clone())),
        TeacherTargets::Sparse {
            ids,
            logprobs,
            present,
        } => TeacherTargets::Sparse {
            ids: Tensor::from_inner(ids.clone()),
            logprobs: Tensor::from_inner(logprobs.clone()),
            present: present.as_ref().map(|p| Tensor::from_inner(p.clone())),
        },
        TeacherTargets::Sampled(lp) => TeacherTargets::Sampled(Tensor::from_inner(lp.clone())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use burn::backend::{Autodiff, Flex};
    use safetensors::{Dtype, SafeTensors};

    use super::*;

    type AD = Autodiff<Flex>;
    type B = Flex;

    struct Fixture {
        f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
        i64s: HashMap<String, (Vec<usize>, Vec<i64>)>,
    }

    fn fixture() -> Fixture {
        fixture_at("loss/reference.safetensors")
    }

    fn fixture_at(name: &str) -> Fixture {
        let bytes = std::fs::read(distill_core::testing::fixtures().join(name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut fx = Fixture {
            f32s: HashMap::new(),
            i64s: HashMap::new(),
        };
        for (name, v) in st.tensors() {
            let shape = v.shape().to_vec();
            match v.dtype() {
                Dtype::F32 => {
                    let d = v
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()));
                    fx.f32s.insert(name, (shape, d.collect()));
                }
                Dtype::I64 => {
                    let d = v
                        .data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()));
                    fx.i64s.insert(name, (shape, d.collect()));
                }
                other => panic!("{other:?}"),
            }
        }
        fx
    }

    impl Fixture {
        fn f<const D: usize>(&self, name: &str) -> Tensor<B, D> {
            let (shape, data) = &self.f32s[name];
            Tensor::from_data(TensorData::new(data.clone(), shape.clone()), &Default::default())
        }
        fn i<const D: usize>(&self, name: &str) -> Tensor<B, D, Int> {
            let (shape, data) = &self.i64s[name];
            Tensor::from_data(TensorData::new(data.clone(), shape.clone()), &Default::default())
        }
    }

    fn vec_of<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    fn assert_close(name: &str, ours: &[f32], theirs: &[f32]) {
        assert_eq!(ours.len(), theirs.len(), "{name}: length");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                "{name}[{i}]: {a} vs reference {b}"
            );
        }
    }

    fn config(kind: KlKind, beta: f64, temperature: f64, missing_mass: MissingMass) -> LossConfig {
        LossConfig {
            kd_ratio: 0.5,
            kind,
            beta,
            temperature,
            missing_mass,
            vocab_limit: Some(9),
            analytic_grad: true,
        }
    }

    /// The on-policy divergence against TRL's own `GKDTrainer.generalized_jsd_loss`
    /// (tests/fixtures/gkd): beta 0 (forward KL), 0.5 and 1 (reverse KL), temperature 1 and
    /// 0.9, over every position and with TRL's -100 label mask. TRL does not scale by T^2;
    /// ours does, so ours / T^2 must equal TRL's sum, value and gradient.
    #[test]
    fn generalized_jsd_matches_trl_gkd() {
        let fx = fixture_at("gkd/reference.safetensors");
        let (student, teacher) = (fx.f::<3>("student"), fx.f::<3>("teacher"));
        let [b, t, v] = student.dims();
        let labels = &fx.i64s["labels"].1;
        let mut cases = 0;
        for beta in [0.0, 0.5, 1.0] {
            for temp in [1.0, 0.9] {
                for masked in [false, true] {
                    let name = format!("b{beta:.1}.t{temp:.1}.{}", if masked { "masked" } else { "all" });
                    let keep: Vec<i64> = (0..b * t)
                        .filter(|&i| !masked || labels[i] != -100)
                        .map(|i| i as i64)
                        .collect();
                    let n = keep.len();
                    let rows = Tensor::<B, 1, Int>::from_data(
                        TensorData::new(keep.clone(), [n]),
                        &Default::default(),
                    );
                    let z = Tensor::<AD, 2>::from_inner(
                        student.clone().reshape([b * t, v]).select(0, rows.clone()),
                    )
                    .require_grad();
                    let cfg = LossConfig {
                        kd_ratio: 1.0,
                        vocab_limit: None,
                        ..config(KlKind::Jsd, beta, temp, MissingMass::OtherBucket)
                    };
                    let dense = TeacherTargets::Dense(Tensor::from_inner(
                        teacher.clone().reshape([b * t, v]).select(0, rows),
                    ));
                    let labels = Tensor::<AD, 1, Int>::zeros([n], &Default::default());
                    let kl = token_loss(z.clone(), labels, &dense, &cfg)
                        .kl
                        .div_scalar(temp * temp);
                    let grads = kl.clone().backward();
                    let ours_grad = vec_of(z.grad(&grads).unwrap());
                    assert_close(
                        &format!("{name} loss"),
                        &vec_of(kl.inner()),
                        &fx.f32s[&format!("{name}.loss")].1,
                    );
                    // TRL's gradient is zero at masked positions; ours covers the kept rows.
                    let theirs = &fx.f32s[&format!("{name}.grad")].1;
                    let mut want = Vec::new();
                    for i in 0..b * t {
                        let row = &theirs[i * v..(i + 1) * v];
                        if keep.contains(&(i as i64)) {
                            want.extend_from_slice(row);
                        } else {
                            assert!(
                                row.iter().all(|&g| g == 0.0),
                                "{name}: TRL trained masked row {i}"
                            );
                        }
                    }
                    assert_close(&format!("{name} grad"), &ours_grad, &want);
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 12);
    }

    /// The sampled-token estimator is unbiased: over tokens drawn from the student, its mean
    /// is the exact reverse KL(q || p) and its mean gradient is the exact gradient
    /// d KL / dz_i = q_i (log q_i - log p_i - KL). Tolerance: 5 standard errors, with the
    /// spread of each per-sample term computed from the draws.
    #[test]
    fn sampled_reverse_kl_is_an_unbiased_estimate_of_the_reverse_kl() {
        let (v, m) = (5usize, 40_000usize);
        let z = [1.2f64, -0.3, 0.4, 2.0, -1.5];
        let zp = [0.1f64, 0.9, -0.6, 1.1, 0.3];
        let log_softmax = |x: &[f64]| {
            let lse = x.iter().map(|a| a.exp()).sum::<f64>().ln();
            x.iter().map(|a| a - lse).collect::<Vec<f64>>()
        };
        let (lq, lp) = (log_softmax(&z), log_softmax(&zp));
        let exact: f64 = (0..v).map(|i| lq[i].exp() * (lq[i] - lp[i])).sum();
        let exact_grad: Vec<f64> = (0..v).map(|i| lq[i].exp() * (lq[i] - lp[i] - exact)).collect();

        let mut rng = distill_core::testing::TestRng::new(3);
        let draws: Vec<usize> = (0..m)
            .map(|_| {
                let mut u = rng.uniform();
                (0..v)
                    .find(|&i| {
                        u -= lq[i].exp();
                        u < 0.0
                    })
                    .unwrap_or(v - 1)
            })
            .collect();
        let device = Default::default();
        let logits: Vec<f32> = (0..m).flat_map(|_| z.iter().map(|&a| a as f32)).collect();
        let zt = Tensor::<AD, 2>::from_data(TensorData::new(logits, [m, v]), &device).require_grad();
        let labels: Vec<i64> = draws.iter().map(|&x| x as i64).collect();
        let labels = Tensor::<AD, 1, Int>::from_data(TensorData::new(labels, [m]), &device);
        let teacher_lp: Vec<f32> = draws.iter().map(|&x| lp[x] as f32).collect();
        let teacher = TeacherTargets::Sampled(Tensor::from_data(TensorData::new(teacher_lp, [m]), &device));
        let cfg = LossConfig {
            kd_ratio: 1.0,
            vocab_limit: None,
            ..config(KlKind::Reverse, 1.0, 1.0, MissingMass::OtherBucket)
        };
        let kl = token_loss(zt.clone(), labels, &teacher, &cfg).kl;
        let grads = kl.clone().backward();
        let estimate = vec_of(kl.inner())[0] as f64 / m as f64;

        let terms: Vec<f64> = draws.iter().map(|&x| lq[x] - lp[x]).collect();
        let sd = (terms.iter().map(|d| (d - exact).powi(2)).sum::<f64>() / m as f64).sqrt();
        let se = sd / (m as f64).sqrt();
        assert!(
            (estimate - exact).abs() < 5.0 * se,
            "estimate {estimate} vs exact {exact} (se {se})"
        );

        let g = vec_of(zt.grad(&grads).unwrap());
        for i in 0..v {
            let per_row: Vec<f64> = (0..m).map(|r| g[r * v + i] as f64).collect();
            let mean = per_row.iter().sum::<f64>() / m as f64;
            let sd = (per_row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / m as f64).sqrt();
            let se = sd / (m as f64).sqrt();
            assert!(
                (mean - exact_grad[i]).abs() < 5.0 * se + 1e-6,
                "d/dz_{i}: mean {mean} vs exact {} (se {se})",
                exact_grad[i]
            );
        }
    }

    #[test]
    fn chunked_loss_matches_pytorch_values_and_gradients() {
        let fx = fixture();
        let mut cases = 0;
        for (mode, teacher) in [
            ("dense", TeacherTargets::Dense(fx.f::<2>("teacher_logits"))),
            (
                "other_bucket",
                TeacherTargets::Sparse {
                    ids: fx.i("topk_ids"),
                    logprobs: fx.f("topk_logprobs"),
                    present: None,
                },
            ),
            (
                "renormalize",
                TeacherTargets::Sparse {
                    ids: fx.i("topk_ids"),
                    logprobs: fx.f("topk_logprobs"),
                    present: None,
                },
            ),
        ] {
            let missing = if mode == "renormalize" {
                MissingMass::Renormalize
            } else {
                MissingMass::OtherBucket
            };
            for (kind, kname, beta) in [
                (KlKind::Forward, "forward", 0.5),
                (KlKind::Reverse, "reverse", 0.5),
                (KlKind::Jsd, "jsd", 0.5),
                (KlKind::Jsd, "jsd", 0.1),
            ] {
                for (t, analytic) in [(1.0, true), (2.0, true), (1.0, false), (2.0, false)] {
                    let name = format!("{mode}.{kname}.b{beta}.t{t:.1}");
                    let cfg = LossConfig {
                        analytic_grad: analytic,
                        ..config(kind, beta, t, missing)
                    };
                    // The closed form must be what the reference checks for the default loss.
                    let default_loss = mode == "other_bucket" && kind == KlKind::Forward;
                    assert_eq!(
                        has_analytic_grad(&teacher, &cfg),
                        analytic && default_loss,
                        "{name}"
                    );
                    let reference = |what: &str| &fx.f32s[&format!("{name}.{what}")].1;
                    // The weight as an lm_head [C, V] and as tied embeddings [V, C] (stored
                    // that way, not a view): the gradient comes back in the weight's layout.
                    for tied in [false, true] {
                        let weight = if tied {
                            let vc = fx.f::<2>("weight").transpose().into_data();
                            HeadWeight::Vc(Tensor::from_data(vc, &Default::default()))
                        } else {
                            HeadWeight::Cv(fx.f("weight"))
                        };
                        let name = format!("{name}{}", if tied { " tied" } else { "" });
                        // chunk 4 over 6 tokens: two chunks of different sizes.
                        let out = chunked_loss::<AD>(
                            fx.f("hidden"),
                            weight,
                            fx.i("labels"),
                            &teacher,
                            &cfg,
                            4,
                            true,
                            1.0,
                        );
                        assert_close(
                            &format!("{name} sums"),
                            &[out.total as f32, out.ce as f32, out.kl as f32],
                            reference("sums"),
                        );
                        assert_close(
                            &format!("{name} grad_hidden"),
                            &vec_of(out.grad_hidden),
                            reference("grad_hidden"),
                        );
                        let grad_weight = out.grad_weight.unwrap();
                        let grad_weight = if tied {
                            grad_weight.transpose()
                        } else {
                            grad_weight
                        };
                        assert_close(
                            &format!("{name} grad_weight"),
                            &vec_of(grad_weight),
                            reference("grad_weight"),
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 96);
    }

    /// The closed-form gradient against autodiff where the fixture does not reach: positions
    /// without a teacher, absent top-k entries, a student so sure of the top-k that its rest
    /// mass clamps at EPS, and CE alone with and without a teacher.
    #[test]
    fn analytic_gradient_equals_autodiff_on_edge_cases() {
        let fx = fixture();
        let device = Default::default();
        let hidden = fx.f::<2>("hidden");
        let [n, _] = hidden.dims();
        let weight = fx.f::<2>("weight");
        let ids = fx.i::<2>("topk_ids");
        let lp = fx.f::<2>("topk_logprobs");
        let k = ids.dims()[1];
        let present: Vec<f32> = (0..n).map(|i| (i % 3 != 1) as u8 as f32).collect();
        let mut lp_data = lp.clone().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        lp_data[k - 1] = f32::NEG_INFINITY; // row 0 lists one id fewer
        let sparse = TeacherTargets::Sparse {
            ids: ids.clone(),
            logprobs: Tensor::from_data(TensorData::new(lp_data, [n, k]), &device),
            present: Some(Tensor::from_data(TensorData::new(present, [n]), &device)),
        };
        // Hidden states 200x larger and the student's argmax listed first: its top-k mass rounds
        // to 1 in f32, so the rest bucket clamps at EPS.
        let saturated = hidden.clone().mul_scalar(200.0);
        let logits = mask_padding(saturated.clone().matmul(weight.clone()), Some(9));
        let top = logits.clone().argmax(1); // [N, 1]
        let q_top = log_softmax(logits, 1).max_dim(1).exp();
        assert!(
            q_top.greater_equal_elem(1.0).any().into_scalar(),
            "no row saturates"
        );
        let sure = match &sparse {
            TeacherTargets::Sparse {
                ids,
                logprobs,
                present,
            } => TeacherTargets::Sparse {
                ids: Tensor::cat(vec![top, ids.clone().narrow(1, 1, k - 1)], 1),
                logprobs: logprobs.clone(),
                present: present.clone(),
            },
            _ => unreachable!(),
        };
        let cases = [
            ("present + absent, t1", hidden.clone(), sparse.clone(), 1.0, 0.5),
            ("present + absent, t2", hidden.clone(), sparse.clone(), 2.0, 0.5),
            ("saturated student", saturated.clone(), sure.clone(), 1.0, 0.5),
            ("saturated student, t2", saturated, sure, 2.0, 0.3),
            ("kd_ratio 0", hidden.clone(), sparse, 1.0, 0.0),
            ("no teacher", hidden.clone(), TeacherTargets::None, 1.0, 0.5),
        ];
        for (name, h, teacher, t, kd) in cases {
            let run = |analytic: bool| {
                let cfg = LossConfig {
                    kd_ratio: kd,
                    analytic_grad: analytic,
                    ..config(KlKind::Forward, 0.5, t, MissingMass::OtherBucket)
                };
                assert_eq!(has_analytic_grad(&teacher, &cfg), analytic, "{name}");
                chunked_loss::<AD>(
                    h.clone(),
                    HeadWeight::Cv(weight.clone()),
                    fx.i("labels"),
                    &teacher,
                    &cfg,
                    4,
                    true,
                    0.5,
                )
            };
            let (ours, autodiff) = (run(true), run(false));
            let sums = |o: &ChunkedLoss<B>| [o.total as f32, o.ce as f32, o.kl as f32];
            assert_close(&format!("{name} sums"), &sums(&ours), &sums(&autodiff));
            assert_close(
                &format!("{name} grad_hidden"),
                &vec_of(ours.grad_hidden),
                &vec_of(autodiff.grad_hidden),
            );
            assert_close(
                &format!("{name} grad_weight"),
                &vec_of(ours.grad_weight.unwrap()),
                &vec_of(autodiff.grad_weight.unwrap()),
            );
        }
    }

    #[test]
    fn chunking_does_not_change_values_or_gradients() {
        let fx = fixture();
        let teacher = TeacherTargets::Dense(fx.f::<2>("teacher_logits"));
        let cfg = config(KlKind::Forward, 0.5, 1.0, MissingMass::OtherBucket);
        let run = |chunk| {
            chunked_loss::<AD>(
                fx.f("hidden"),
                HeadWeight::Cv(fx.f("weight")),
                fx.i("labels"),
                &teacher,
                &cfg,
                chunk,
                true,
                0.25,
            )
        };
        let (one, many) = (run(6), run(1));
        assert!((one.total - many.total).abs() < 1e-5);
        assert_close("grad_hidden", &vec_of(many.grad_hidden), &vec_of(one.grad_hidden));
        assert_close(
            "grad_weight",
            &vec_of(many.grad_weight.unwrap()),
            &vec_of(one.grad_weight.unwrap()),
        );
    }

    /// Soft-label shards pad positions with fewer than k entries (log-prob -inf): padding
    /// must change nothing against the PyTorch reference for the unpadded top-k.
    #[test]
    fn absent_entries_and_positions_match_the_reference() {
        let fx = fixture();
        let ids = fx.i::<2>("topk_ids");
        let lp = fx.f::<2>("topk_logprobs");
        let [n, _] = ids.dims();
        let device = Default::default();
        let padded = TeacherTargets::Sparse {
            ids: Tensor::cat(vec![ids.clone(), Tensor::zeros([n, 2], &device)], 1),
            logprobs: Tensor::cat(
                vec![lp.clone(), Tensor::full([n, 2], f32::NEG_INFINITY, &device)],
                1,
            ),
            present: None,
        };
        for (mode, missing) in [
            ("other_bucket", MissingMass::OtherBucket),
            ("renormalize", MissingMass::Renormalize),
        ] {
            let name = format!("{mode}.forward.b0.5.t2.0");
            let cfg = config(KlKind::Forward, 0.5, 2.0, missing);
            let out = chunked_loss::<AD>(
                fx.f("hidden"),
                HeadWeight::Cv(fx.f("weight")),
                fx.i("labels"),
                &padded,
                &cfg,
                4,
                true,
                1.0,
            );
            let sums = &fx.f32s[&format!("{name}.sums")].1;
            assert_close(&name, &[out.total as f32, out.ce as f32, out.kl as f32], sums);
            assert_close(
                &name,
                &vec_of(out.grad_hidden),
                &fx.f32s[&format!("{name}.grad_hidden")].1,
            );
        }
        // Positions marked absent train on CE alone: their KL drops out of the sum.
        let cfg = config(KlKind::Forward, 0.5, 1.0, MissingMass::OtherBucket);
        let with = |present: Vec<f32>| {
            let t = TeacherTargets::Sparse {
                ids: ids.clone(),
                logprobs: lp.clone(),
                present: Some(Tensor::from_data(TensorData::new(present, [n]), &device)),
            };
            token_loss(
                fx.f::<2>("hidden").matmul(fx.f::<2>("weight")),
                fx.i("labels"),
                &t,
                &cfg,
            )
        };
        let all: f32 = with(vec![1.0; n]).kl.into_scalar();
        let none = with(vec![0.0; n]);
        assert_eq!(none.kl.into_scalar(), 0.0f32);
        let first_only: f32 = with((0..n).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect())
            .kl
            .into_scalar();
        assert!(first_only > 0.0 && first_only < all, "{first_only} vs {all}");
    }

    #[test]
    fn divergence_of_a_distribution_with_itself_is_zero() {
        let fx = fixture();
        let logits = fx.f::<2>("teacher_logits");
        for kind in [KlKind::Forward, KlKind::Reverse, KlKind::Jsd] {
            let cfg = LossConfig {
                kd_ratio: 1.0,
                ..config(kind, 0.5, 2.0, MissingMass::OtherBucket)
            };
            let sums = token_loss(
                logits.clone(),
                fx.i("labels"),
                &TeacherTargets::Dense(logits.clone()),
                &cfg,
            );
            let kl: f32 = sums.kl.into_scalar();
            assert!(kl.abs() < 1e-5, "{kind:?}: {kl}");
        }
    }

    #[test]
    fn closed_form_cross_entropy_and_kd_ratio_zero() {
        // logits [0, ln 3]: p = [1/4, 3/4]; CE(label 1) = -ln(3/4).
        let device = Default::default();
        let logits = Tensor::<B, 2>::from_data(TensorData::new(vec![0.0f32, 3f32.ln()], [1, 2]), &device);
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![1i64], [1]), &device);
        let teacher = TeacherTargets::Dense(Tensor::zeros([1, 2], &device));
        let cfg = LossConfig {
            kd_ratio: 0.0,
            vocab_limit: None,
            ..config(KlKind::Forward, 0.5, 1.0, MissingMass::OtherBucket)
        };
        let sums = token_loss(logits, labels, &teacher, &cfg);
        let ce: f32 = sums.ce.into_scalar();
        let total: f32 = sums.total.into_scalar();
        assert!((ce - (-(0.75f32).ln())).abs() < 1e-6);
        assert!((total - ce).abs() < 1e-7, "kd_ratio 0 is CE alone");
    }

    #[test]
    fn no_tokens_give_zero_loss_and_empty_gradient() {
        let device = Default::default();
        let out = chunked_loss::<AD>(
            Tensor::zeros([0, 5], &device),
            HeadWeight::Cv(Tensor::zeros([5, 11], &device)),
            Tensor::zeros([0], &device),
            &TeacherTargets::None,
            &config(KlKind::Forward, 0.5, 1.0, MissingMass::OtherBucket),
            4,
            true,
            1.0,
        );
        assert_eq!((out.total, out.ce, out.kl), (0.0, 0.0, 0.0));
        assert_eq!(out.grad_hidden.dims(), [0, 5]);
        assert!(out.grad_weight.is_none());
    }

    /// Full fine-tuning's head: an f32 master weight under lower-precision activations. The
    /// head runs in the activations' dtype; each gradient comes back in its input's dtype,
    /// the weight's summed over chunks equal to one chunk's.
    #[test]
    fn mixed_precision_head_gives_gradients_in_their_inputs_dtypes() {
        let device = Default::default();
        // The test's own generator: burn's is one for the process, which training runs beside
        // this test draw from.
        let mut rng = distill_core::testing::TestRng::new(11);
        let mut normal = |shape: [usize; 2]| {
            let values = rng.normal_vec(shape.iter().product(), 0.0, 1.0);
            Tensor::<Flex, 2>::from_data(TensorData::new(values, shape), &device)
        };
        let (hidden, weight) = (normal([6, 4]), normal([4, 9]));
        let labels =
            Tensor::<Flex, 1, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6], [6]), &device);
        let cfg = config(KlKind::Forward, 0.5, 1.0, MissingMass::OtherBucket);
        let run = |chunk: usize| {
            chunked_loss::<AD>(
                hidden.clone().cast(DType::F16),
                HeadWeight::Cv(weight.clone()),
                labels.clone(),
                &TeacherTargets::None,
                &cfg,
                chunk,
                true,
                1.0,
            )
        };
        let (chunked, whole) = (run(2), run(6));
        let gw = chunked.grad_weight.expect("asked for");
        assert_eq!(gw.dtype(), DType::F32);
        assert_eq!(chunked.grad_hidden.dtype(), DType::F16);
        let diff: f32 = (gw - whole.grad_weight.expect("asked for"))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-2, "chunked weight gradient differs by {diff}");
    }
}
