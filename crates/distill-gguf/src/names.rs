//! Tensor names: llama.cpp's (`blk.N.attn_q.weight`) and Hugging Face's
//! (`model.layers.N.self_attn.q_proj.weight`) for the llama and qwen2 architectures, and the
//! row permutation llama.cpp's converter applies to Llama's q/k projections.

/// Per-layer tensors: (llama.cpp name, HF name) without the `blk.N.` / `model.layers.N.`
/// prefix and the `.weight` / `.bias` suffix.
const LAYER: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Model-level tensors.
const GLOBAL: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

fn split_suffix(name: &str) -> Option<(&str, &str)> {
    ["weight", "bias"]
        .into_iter()
        .find_map(|s| name.strip_suffix(s)?.strip_suffix('.').map(|stem| (stem, s)))
}

/// The HF name of a llama.cpp tensor, or None for tensors HF checkpoints do not hold
/// (e.g. `rope_freqs.weight`).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    let (stem, suffix) = split_suffix(name)?;
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, hf) = LAYER.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{layer}.{hf}.{suffix}"));
    }
    let (_, hf) = GLOBAL.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{hf}.{suffix}"))
}

/// The llama.cpp name of an HF tensor, or None for names outside the mapping.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let (stem, suffix) = split_suffix(name)?;
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (g, _) = LAYER.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{layer}.{g}.{suffix}"));
    }
    let (g, _) = GLOBAL.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{suffix}"))
}

/// Which rows a Llama q/k projection's permutation moves: `heads` heads of `rows / heads` rows.
/// HF keeps each head's rotary pairs as (first half, second half) ("rotate_half"); llama.cpp's
/// converter interleaves them (row `h*hd + i` for i < hd/2 goes to `h*hd + 2i`, row
/// `h*hd + hd/2 + i` to `h*hd + 2i + 1`) because ggml's default rope rotates adjacent pairs.
fn permuted_row(row: usize, head_dim: usize) -> usize {
    let (head, r) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    let (part, i) = (r / half, r % half);
    head * head_dim + 2 * i + part
}

/// HF row order -> llama.cpp row order (what convert_hf_to_gguf.py's `permute` does).
pub fn permute_rows(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    move_rows(data, rows, heads, permuted_row)
}

/// llama.cpp row order -> HF row order (transformers' `reverse_permute_weights`).
pub fn unpermute_rows(data: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    // Row r of the output (HF) came from GGUF row permuted_row(r).
    let cols = data.len() / rows;
    let head_dim = rows / heads;
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        let src = permuted_row(r, head_dim);
        out[r * cols..(r + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    out
}

/// Writes row `src` of `data` to row `dest(src)` of the output.
fn move_rows(data: &[f32], rows: usize, heads: usize, dest: impl Fn(usize, usize) -> usize) -> Vec<f32> {
    let cols = data.len() / rows;
    let head_dim = rows / heads;
    let mut out = vec![0.0; data.len()];
    for src in 0..rows {
        let d = dest(src, head_dim);
        out[d * cols..(d + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("blk.11.attn_q.bias", "model.layers.11.self_attn.q_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
            ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
        ];
        for (g, h) in pairs {
            assert_eq!(gguf_to_hf(g).as_deref(), Some(h));
            assert_eq!(hf_to_gguf(h).as_deref(), Some(g));
        }
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
        assert_eq!(hf_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
    }

    /// The permutation as convert_hf_to_gguf.py writes it in numpy:
    /// w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape).
    #[test]
    fn permutation_matches_the_numpy_reshape_and_inverts() {
        let (heads, head_dim, cols) = (3, 4, 2);
        let rows = heads * head_dim;
        let data: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let permuted = permute_rows(&data, rows, heads);
        // numpy: out[h, i, p, :] = w[h, p, i, :], flattened to row h*hd + 2i + p.
        for h in 0..heads {
            for p in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = h * head_dim + p * (head_dim / 2) + i;
                    let dst = h * head_dim + 2 * i + p;
                    assert_eq!(
                        permuted[dst * cols..(dst + 1) * cols],
                        data[src * cols..(src + 1) * cols]
                    );
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, rows, heads), data);
    }
}
