//! B2: the chunked KL + CE loss against a full-logits one.

use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use distill_models::{DecoderConfig, Kernels};
use distill_train::loss::{HeadWeight, LossConfig, TeacherTargets, chunked_loss};

use crate::time_calls;
use crate::train::{random_below, synthetic_teacher};

type Ad<B> = Autodiff<B>;

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
