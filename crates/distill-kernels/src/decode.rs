//! What a fused decoding step reads ([`crate::ModelKernels::decode_step`]): a decoder's weights
//! as the decoding copy holds them, and one step's inputs. Backend-neutral; the models crate
//! fills them in, a backend with such a path (CUDA: `cuda::decode`) runs them.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::KeyRanges;

/// A decoder's weights for a fused step: dense, in the activations' dtype, with q/k/v and
/// gate/up each one matrix (the decoding copy's fused projections).
pub struct DecodeWeights<'a, B: Backend> {
    /// The embedding table [V, C].
    pub embed: &'a Tensor<B, 2>,
    pub layers: Vec<DecodeLayer<'a, B>>,
    /// The final norm's weight [C].
    pub norm: &'a Tensor<B, 1>,
    /// [C, V]: the head's weight, or the transposed view of `embed` for a tied head.
    pub lm_head: Tensor<B, 2>,
    /// The norms' epsilon.
    pub eps: f64,
    /// Query and K/V heads.
    pub heads: [usize; 2],
    pub head_dim: usize,
}

/// One decoder layer of [`DecodeWeights`].
pub struct DecodeLayer<'a, B: Backend> {
    /// [C]
    pub input_norm: &'a Tensor<B, 1>,
    /// q, k and v: [C, (H + 2 KV) hd] in all, with their biases if the model has them.
    pub qkv: Projection<'a, B>,
    /// [H hd, C], no bias.
    pub o_proj: &'a Tensor<B, 2>,
    /// [C]
    pub post_norm: &'a Tensor<B, 1>,
    /// gate, then up: [C, 2 I] in all, no bias.
    pub gate_up: Projection<'a, B>,
    /// [I, C], no bias.
    pub down_proj: &'a Tensor<B, 2>,
}

/// Linear layers whose outputs sit side by side in one row (q/k/v, gate/up): each part's
/// weight [in, out_i] and bias, in order. The decoding copy's fused projection is one part;
/// a copy too large to fuse (7B on a 24 GB card) gives the parts.
pub type Projection<'a, B> = Vec<(&'a Tensor<B, 2>, Option<&'a Tensor<B, 1>>)>;

/// One decoding step's inputs: one new token per row at cache position `at` (the same in
/// every row: left-padded rows), its rotary tables [R, 1, hd], the keys each row's query
/// sees (R = the batch or 1, as the models' `Context` makes them) and where the paged cache
/// keeps each row's positions.
pub struct DecodeInputs<'a, B: Backend> {
    /// [B] token ids.
    pub ids: Tensor<B, 1, Int>,
    pub cos: &'a Tensor<B, 3>,
    pub sin: &'a Tensor<B, 3>,
    pub keys: Option<&'a KeyRanges<B>>,
    pub at: usize,
    pub pages: PageTable<'a, B>,
}

/// Where a paged KV cache keeps each row's positions (the models' `PagedKv`): its layers'
/// pools are slots [slots, KV, hd], `page_len` slots a page; row b's position p is slot
/// `table[b * ld + (p + shift[b]) / page_len] * page_len + (p + shift[b]) % page_len`. Every page
/// a row names up to position `at` exists, and no two rows write one page.
pub struct PageTable<'a, B: Backend> {
    /// i32 [B * ld]: each row's `ld` pages in order (unused entries name any page). Flat,
    /// since burn may pitch a 2-D tensor's rows on CUDA (a row stride past its width).
    pub table: &'a Tensor<B, 1, Int>,
    pub ld: usize,
    /// i32 [B]: the slot of each row's position 0 in its first page.
    pub shift: &'a Tensor<B, 1, Int>,
    pub page_len: usize,
}

/// Each layer's pools of keys and values [slots, KV, hd] ([`PageTable`]): the step writes
/// its position's keys and values into them and reads positions 0..=at of each row.
pub type CacheBuffers<B> = Vec<(Tensor<B, 3>, Tensor<B, 3>)>;

/// Positions 0..s of every row of a pool [slots, KV, hd] read through `pages`, as a
/// contiguous [B, KV, s, hd] (positions in a row's padding read its zero page).
pub fn gather_pages<B: Backend>(pool: Tensor<B, 3>, pages: &PageTable<'_, B>, s: usize) -> Tensor<B, 4> {
    let [b] = pages.shift.dims();
    let [_, h, d] = pool.dims();
    let pl = pages.page_len as i64;
    let device = pool.device();
    // slot in the row's pages [B, s], then its page and offset, then the pool's slot.
    let at = Tensor::<B, 1, Int>::arange(0..s as i64, &device).reshape([1, s])
        + pages.shift.clone().reshape([b, 1]);
    let page = pages
        .table
        .clone()
        .reshape([b, pages.ld])
        .gather(1, at.clone().div_scalar(pl));
    let slots = page.mul_scalar(pl) + at.remainder_scalar(pl);
    pool.select(0, slots.reshape([b * s]))
        .reshape([b, s, h, d])
        .swap_dims(1, 2)
}

/// What a backend keeps from one fused decoding step of a cache to the next (CUDA: the
/// step's work buffers and the CUDA graph that issues it), held by the cache and dropped
/// with it. A copy of a cache starts without one: its buffers are others.
#[derive(Default)]
pub struct StepState(pub(crate) Option<Box<dyn std::any::Any + Send>>);

impl Clone for StepState {
    fn clone(&self) -> Self {
        StepState(None)
    }
}

impl std::fmt::Debug for StepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "StepState(kept)"
        } else {
            "StepState(none)"
        })
    }
}
