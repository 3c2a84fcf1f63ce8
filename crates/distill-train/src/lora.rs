//! LoRA: adapters on the chosen linear layers of a frozen model, merging, and PEFT naming.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use distill_core::recipe::LoraSection;
use distill_models::transformer::{Linear, Lora, Weight};
use distill_models::{CausalLm, Kernels};

/// Freezes every weight of `model` and adds trainable f32 LoRA factors to the target
/// layers: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, so the
/// model starts out computing exactly what the base does. Scale = alpha / r.
///
/// A is drawn on the host from `seed`, so the same recipe gives the same adapters whatever
/// else uses the backend's random generator.
pub fn add_lora<B: Kernels>(
    model: CausalLm<B>,
    cfg: &LoraSection,
    seed: u64,
    device: &B::Device,
) -> CausalLm<B> {
    let mut model = model.no_grad();
    let scale = cfg.alpha / cfg.r as f64;
    let mut rng = seed ^ 0x4C6F_5241; // "LoRA"
    let mut make = |linear: &mut Linear<B>| {
        let [d_in, d_out] = linear.weight.dims();
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..d_in * cfg.r)
            .map(|_| ((distill_data::examples::uniform01(&mut rng) * 2.0 - 1.0) * bound) as f32)
            .collect();
        linear.lora = Some(Lora {
            lora_a: Param::from_tensor(Tensor::from_data(
                TensorData::new(a, [d_in, cfg.r]),
                (device, DType::F32),
            )),
            lora_b: Param::from_tensor(Tensor::zeros([cfg.r, d_out], (device, DType::F32))),
            scale,
            dropout: cfg.dropout,
        });
    };
    let wants = |name: &str| cfg.targets.iter().any(|t| t == name);
    for layer in &mut model.model.layers {
        let a = &mut layer.self_attn;
        for (name, linear) in [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
        ] {
            if wants(name) {
                make(linear);
            }
        }
        let m = &mut layer.mlp;
        for (name, linear) in [
            ("gate_proj", &mut m.gate_proj),
            ("up_proj", &mut m.up_proj),
            ("down_proj", &mut m.down_proj),
        ] {
            if wants(name) {
                make(linear);
            }
        }
    }
    model
}

/// For full fine-tuning: every parameter trainable and stored in f32 (the master copy;
/// forward casts to the activation dtype).
pub fn full_finetune<B: Backend, M: Module<B>>(model: M) -> M {
    struct ToF32;
    impl<B: Backend> ModuleMapper<B> for ToF32 {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            // Untrack first (detach keeps require_grad): a cast of a tracked bf16 parameter
            // would be an op output, which cannot become a leaf.
            param.map(|t| t.set_require_grad(false).cast(DType::F32).require_grad())
        }
    }
    model.map(&mut ToF32)
}

/// W + scale * A B for every adapted layer, adapters removed: the plain model to export.
/// The weights must be dense: a QLoRA run merges into the base read again from its files
/// ([`crate::export::export_merged`]), not into the 4-bit rounding of it.
pub fn merge<B: Kernels>(mut model: CausalLm<B>) -> CausalLm<B> {
    let fold = |linear: &mut Linear<B>| {
        if let Some(lora) = linear.lora.take() {
            let w = linear.weight.dense().expect("merge: an NF4 weight");
            let delta = lora
                .lora_a
                .val()
                .matmul(lora.lora_b.val())
                .mul_scalar(lora.scale)
                .cast(w.val().dtype());
            linear.weight = Weight::Dense(Param::initialized(w.id, w.val() + delta));
        }
    };
    for layer in &mut model.model.layers {
        let a = &mut layer.self_attn;
        for linear in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            fold(linear);
        }
        let m = &mut layer.mlp;
        for linear in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
            fold(linear);
        }
    }
    model
}

/// Our parameter name of a LoRA factor -> PEFT's tensor name, and whether it is A.
/// `model.layers.0.self_attn.q_proj.lora.lora_a` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_name(name: &str) -> Option<String> {
    let (prefix, factor) = name.rsplit_once(".lora.")?;
    let peft = match factor {
        "lora_a" => "lora_A",
        "lora_b" => "lora_B",
        _ => return None,
    };
    Some(format!("base_model.model.{prefix}.{peft}.weight"))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::params::param_infos;

    type AD = Autodiff<Flex>;

    fn fixture() -> std::path::PathBuf {
        distill_core::testing::fixtures().join("tiny-qwen2")
    }

    fn ids() -> Tensor<Flex, 2, Int> {
        Tensor::from_data(
            TensorData::new(vec![1i64, 17, 200, 33, 5], [1, 5]),
            &Default::default(),
        )
    }

    #[test]
    fn only_adapters_train_and_a_fresh_adapter_changes_nothing() {
        let device = Default::default();
        let model = CausalLm::<AD>::load(&fixture(), &device).unwrap();
        let cfg = LoraSection::default();
        let model = add_lora(model, &cfg, 1, &device);
        let infos = param_infos(&model);
        let trainable: Vec<&str> = infos
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            trainable.len(),
            2 * 7 * 2,
            "A and B on 7 layers x 2 blocks: {trainable:?}"
        );
        assert!(trainable.iter().all(|n| n.contains(".lora.lora_")));
        assert!(
            infos
                .iter()
                .any(|p| p.name == "model.layers.1.mlp.down_proj.weight" && !p.trainable)
        );
        let base = CausalLm::<Flex>::load(&fixture(), &device).unwrap();
        let a: Vec<f32> = base.forward(ids()).into_data().to_vec().unwrap();
        let b: Vec<f32> = model.valid().forward(ids()).into_data().to_vec().unwrap();
        assert_eq!(a, b, "B = 0 at init");
    }

    #[test]
    fn merged_weights_compute_what_the_adapters_compute() {
        let device = Default::default();
        let cfg = LoraSection {
            r: 4,
            alpha: 8.0,
            ..Default::default()
        };
        let model = add_lora(
            CausalLm::<Flex>::load(&fixture(), &device).unwrap(),
            &cfg,
            2,
            &device,
        );
        // Give B values so the adapters matter.
        let mut model = model;
        for layer in &mut model.model.layers {
            for linear in [&mut layer.self_attn.q_proj, &mut layer.mlp.down_proj] {
                let lora = linear.lora.as_mut().unwrap();
                let [r, out] = lora.lora_b.val().dims();
                let values: Vec<f32> = (0..r * out)
                    .map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.5)
                    .collect();
                lora.lora_b =
                    Param::from_tensor(Tensor::from_data(TensorData::new(values, [r, out]), &device));
            }
        }
        let with_adapters: Vec<f32> = model.forward(ids()).into_data().to_vec().unwrap();
        let base: Vec<f32> = CausalLm::<Flex>::load(&fixture(), &device)
            .unwrap()
            .forward(ids())
            .into_data()
            .to_vec()
            .unwrap();
        let merged: Vec<f32> = merge(model).forward(ids()).into_data().to_vec().unwrap();
        let max_diff = with_adapters
            .iter()
            .zip(&merged)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let moved = with_adapters
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            moved > 1e-3,
            "adapters must change the output for this test to mean anything"
        );
        assert!(max_diff < 1e-5, "merge differs by {max_diff}");
    }

    #[test]
    fn peft_names() {
        assert_eq!(
            peft_name("model.layers.0.self_attn.q_proj.lora.lora_a").unwrap(),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(peft_name("model.norm.weight"), None);
    }
}
