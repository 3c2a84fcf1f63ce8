//! The FLOP counts MFU is reported against.
//!
//! FLOP conventions (docs/PERFORMANCE.md): N counts the parameters a token multiplies
//! through (every linear layer and the LM head, tied or not; no embedding lookup, norm or
//! bias). Attention follows PaLM / torchtitan: 4·L·H·hd·T per token forward for a row of T
//! tokens (every key counted, not the causal half), three times that for forward and
//! backward. Full fine-tuning is 6N + 12·L·H·hd·T per token; LoRA is 4N (no weight
//! gradients of the frozen base) + 6·N_lora + 12·L·H·hd·T. Recomputed forwards are not
//! counted (model FLOPs, not hardware FLOPs).

use distill_models::DecoderConfig;

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

pub(crate) fn dims(c: &DecoderConfig) -> (u64, u64, u64, u64) {
    (
        c.hidden_size as u64,
        (c.num_attention_heads * c.head_dim) as u64,
        (c.num_key_value_heads * c.head_dim) as u64,
        c.intermediate_size as u64,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use distill_core::recipe::LoraSection;
    use distill_hf::config::RopeScaling;
    use distill_models::Architecture;

    use super::*;
    use crate::gemm::Gemm;
    use crate::loss::loss_flops;

    /// hidden 4, 2 layers, 2 heads of 2, 1 KV head, MLP 8, vocab 10.
    pub(crate) fn toy() -> DecoderConfig {
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
}
