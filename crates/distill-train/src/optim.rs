//! AdamW with decoupled weight decay (none on norms and biases, i.e. 1-D parameters),
//! moments kept in f32, and the learning-rate schedule.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use distill_core::recipe::{Schedule, TrainSection};

use crate::params::GradStore;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    pub fn from_recipe(t: &TrainSection) -> Self {
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }
}

/// First and second moments of one parameter, flattened.
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Updates applied so far (bias correction uses it).
    pub t: u64,
    pub moments: BTreeMap<ParamId, Moments<B>>,
    /// Parameters that get weight decay (matrices); norms and biases do not.
    pub decayed: BTreeSet<ParamId>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig, decayed: BTreeSet<ParamId>) -> Self {
        AdamW {
            config,
            t: 0,
            moments: BTreeMap::new(),
            decayed,
        }
    }

    /// One update of every parameter that has a gradient in `grads`, each gradient taken
    /// times `grad_scale` (global-norm clipping's factor, 1 without clipping).
    pub fn step<AD, M>(&mut self, module: M, grads: &GradStore<B>, lr: f64, grad_scale: f64) -> M
    where
        AD: AutodiffBackend<InnerBackend = B>,
        M: Module<AD>,
    {
        self.t += 1;
        let mut mapper = Updater::<AD> {
            opt: self,
            grads,
            lr,
            grad_scale,
        };
        module.map(&mut mapper)
    }
}

struct Updater<'a, AD: AutodiffBackend> {
    opt: &'a mut AdamW<AD::InnerBackend>,
    grads: &'a GradStore<AD::InnerBackend>,
    lr: f64,
    grad_scale: f64,
}

impl<AD: AutodiffBackend> ModuleMapper<AD> for Updater<'_, AD> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AD, D>>) -> Param<Tensor<AD, D>> {
        let Some(grad) = self.grads.get(&param.id) else {
            return param;
        };
        let (id, value, mapper) = param.consume();
        let shape = value.shape();
        let n = shape.num_elements();
        let p = value.inner().cast(DType::F32).reshape([n]); // [n]
        let g = grad.clone().cast(DType::F32);
        let c = self.opt.config;
        let state = self.opt.moments.remove(&id).unwrap_or_else(|| Moments {
            m: p.zeros_like(),
            v: p.zeros_like(),
        });
        // Every scalar factor rides on an op that runs anyway: the clipping scale s on the
        // moment updates, the bias corrections on the step and eps. With bc_i = 1 - beta_i^t,
        // torch's p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) is
        //     p -= (lr sqrt(bc2)/bc1) * m / (sqrt(v) + eps sqrt(bc2)).
        // Each op is a kernel launch per parameter on a GPU, and launches are most of a
        // small step's time.
        let s = self.grad_scale;
        let m = state.m.mul_scalar(c.beta1) + g.clone().mul_scalar((1.0 - c.beta1) * s);
        let v = state.v.mul_scalar(c.beta2) + g.square().mul_scalar((1.0 - c.beta2) * s * s);
        let t = self.opt.t as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let mut p = p;
        if self.opt.decayed.contains(&id) && c.weight_decay > 0.0 {
            p = p.mul_scalar(1.0 - self.lr * c.weight_decay);
        }
        let denom = v.clone().sqrt().add_scalar(c.eps * bc2.sqrt());
        let p = p - (m.clone() / denom).mul_scalar(self.lr * bc2.sqrt() / bc1);
        self.opt.moments.insert(id, Moments { m, v });
        let updated = Tensor::<AD, D>::from_inner(p.reshape(shape)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up to `lr`, then
/// cosine or linear decay to `lr * min_lr_ratio`, or constant.
pub fn learning_rate(t: &TrainSection, step: usize, total: usize) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(t.warmup_steps).max(1);
    let progress = ((step - t.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let floor = t.lr * t.min_lr_ratio;
    match t.schedule {
        Schedule::Constant => t.lr,
        Schedule::Linear => floor + (t.lr - floor) * (1.0 - progress),
        Schedule::Cosine => floor + (t.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;

    use super::*;
    use crate::params::collect_grads;

    type AD = Autodiff<Flex>;

    /// Two AdamW steps on y = sum(W x) against the closed form (torch.optim.AdamW semantics).
    #[test]
    fn adamw_matches_the_closed_form() {
        let device = Default::default();
        let layer: Linear<AD> = LinearConfig::new(2, 1).with_bias(false).init(&device);
        let layer = Linear {
            weight: Param::initialized(
                layer.weight.id,
                Tensor::from_data(TensorData::new(vec![0.5f32, -1.0], [2, 1]), &device).require_grad(),
            ),
            ..layer
        };
        let x = Tensor::<AD, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2]), &device);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        for scale in [1.0, 0.25] {
            check_two_steps(layer.clone(), x.clone(), cfg, scale);
        }
    }

    /// Two steps with every gradient times `scale` (clipping's factor).
    fn check_two_steps(layer: Linear<AD>, x: Tensor<AD, 2>, cfg: AdamWConfig, scale: f64) {
        let mut opt = AdamW::new(cfg, [layer.weight.id].into());
        let mut layer = layer;
        let lr = 0.01;
        // grad of sum(x W) w.r.t. W is x^T = [1, 2] at every step.
        let mut w = [0.5f64, -1.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            let grads = layer.forward(x.clone()).sum().backward();
            let mut store = GradStore::default();
            collect_grads(&layer, &grads, &mut store);
            layer = opt.step::<AD, _>(layer, &store, lr, scale);
            for i in 0..2 {
                let g = [1.0, 2.0][i] * scale;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                w[i] = w[i] * (1.0 - lr * 0.1) - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let ours: Vec<f32> = layer
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        for i in 0..2 {
            assert!(
                (f64::from(ours[i]) - w[i]).abs() < 1e-6,
                "scale {scale}: {ours:?} vs {w:?}"
            );
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let t = TrainSection {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(learning_rate(&t, 0, 14), 0.25);
        assert_eq!(learning_rate(&t, 3, 14), 1.0);
        assert!((learning_rate(&t, 4, 14) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 9, 14) - 0.55).abs() < 1e-12, "cosine midpoint");
        assert!((learning_rate(&t, 14, 14) - 0.1).abs() < 1e-12);
        let lin = TrainSection {
            schedule: Schedule::Linear,
            ..t.clone()
        };
        assert!((learning_rate(&lin, 9, 14) - 0.55).abs() < 1e-12);
        let constant = TrainSection {
            schedule: Schedule::Constant,
            ..t
        };
        assert_eq!(learning_rate(&constant, 10, 14), 1.0);
    }
}
