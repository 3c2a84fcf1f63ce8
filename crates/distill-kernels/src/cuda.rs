//! The CUDA backend's [`Kernels`] impl (`Cuda<bf16>`, `Cuda<f32>`): each method calls its
//! kernel module (`cublas`, `flash`, `softmax`, `logits`, `elementwise`, `optim`, `nf4`,
//! `sample`) and falls back to the burn-op default, noted once, when the kernel cannot take
//! the input or cannot run.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor};

use crate::nf4::Nf4Tensor;

use crate::{
    AdamWScalars, AttentionMode, CacheBuffers, DecodeInputs, DecodeWeights, KeyRanges, MemoryPolicy,
    ModelKernels, RowSampling, TrainKernels, adamw_default, attention, attention_default, attention_mode,
    bmm_accumulate_default, bmm_default, concat_f32_default, prim, rms_norm_default, tensor,
};

type CudaTensor = burn_cubecl::tensor::CubeTensor<burn_cubecl::cubecl::cuda::CudaRuntime>;

/// `t` with the compact strides of its shape when only its size-1 dimensions' strides are off
/// ([`crate::layout::compact_up_to_unit_dims`]): burn's `reshape` and `into_contiguous` then
/// take it as it is instead of copying it. A metadata change; no element moves.
fn unit_dims_compact(mut t: CudaTensor) -> CudaTensor {
    let compact = crate::layout::compact_up_to_unit_dims(&t.meta.shape()[..], &t.meta.strides()[..]);
    if let Some(compact) = compact {
        let strides = t.meta.strides_mut();
        for (i, c) in compact.into_iter().enumerate() {
            strides[i] = c;
        }
    }
    t
}

/// `t` as a contiguous tensor, for a kernel's input: its own buffer when only size-1
/// dimensions' strides are off ([`unit_dims_compact`]), else burn's `into_contiguous` (a copy
/// when it is strided).
pub(crate) fn contiguous(t: CudaTensor) -> CudaTensor {
    burn_cubecl::kernel::into_contiguous(unit_dims_compact(t))
}

/// The mask cuDNN's attention takes, if `keys` is one and rows of `t` tokens go to cuDNN:
/// Some(true) causal, Some(false) none. Packed documents, padding and short rows stay with
/// the flash kernels; so does everything when cuDNN is off or missing (not a fallback worth a
/// note).
fn cudnn_mask<B: burn::tensor::backend::Backend>(keys: Option<&KeyRanges<B>>, t: usize) -> Option<bool> {
    let causal = match keys {
        None => false,
        Some(k) if k.causal => true,
        Some(_) => return None,
    };
    (t >= cudnn::min_tokens() && cudnn::usable()).then_some(causal)
}

/// cuBLAS GEMMs on burn's CUDA tensors.
pub mod cublas;
/// Training attention through cuDNN's fused engines.
pub mod cudnn;
/// A whole decoding step as one task on the device thread.
pub mod decode;
/// RMSNorm, SwiGLU and RoPE, forward and backward.
pub mod elementwise;
/// Flash attention forward and backward on tensor cores.
pub mod flash;
/// A decoding step replayed from a CUDA graph.
mod graph;
/// The loss's passes over logits.
pub mod logits;
/// NCCL's all-reduce across the GPUs of this process, for data-parallel training.
pub mod nccl;
/// NF4 dequantization as one kernel.
pub mod nf4;
/// Run-time compiled CUDA C kernels.
pub(crate) mod nvrtc;
/// Tensors parked in pinned host memory, copied on a stream of their own.
pub mod offload;
/// The AdamW update, the flat group's assembly and its sum of squares.
pub mod optim;
/// The driver's memory pool under cubecl's allocations.
pub mod pool;
/// The next token of each row, drawn on the device.
pub mod sample;
/// Attention's softmax and its backward, fused.
pub mod softmax;
/// The bridge to cubecl's device thread and CUDA stream: where our GPU work is queued.
pub mod stream;
/// GPU time of decoding steps.
pub mod timing;

/// burn's CUDA backend (`Cuda<bf16>`, `Cuda<f32>`; built without the fusion decorator):
/// bf16/f16 GEMMs and batched GEMMs go to cuBLAS, anything cuBLAS is not used for (f32 inputs,
/// odd shapes, no libcublas, `DISTILL_CUBLAS=off`) to burn's matmul.
impl<F, I, BT> ModelKernels for burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    const FAST_GEMM: bool = true;
    const FUSED_DECODE: bool = true;

    fn gemm(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        match cublas::gemm(a, b) {
            Ok(c) => c,
            Err((a, b)) => <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_matmul(a, b),
        }
    }

    fn bmm(a: FloatTensor<Self>, b: FloatTensor<Self>, out: FloatDType) -> FloatTensor<Self> {
        match cublas::bmm(a, b, out.into()) {
            Ok(c) => c,
            Err((a, b)) => bmm_default::<Self>(a, b, out),
        }
    }

    fn bmm_accumulate(
        acc: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match cublas::bmm_accumulate(acc, a, b) {
            Ok(c) => c,
            Err((acc, a, b)) => bmm_accumulate_default::<Self>(acc, a, b),
        }
    }

    fn linear_residual(
        residual: Tensor<Self, 3>,
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        let ([b, t, n], k) = (residual.dims(), x.dims()[2]);
        // A decode step's [B, 1, C] may carry strides that would make the reshapes copy.
        let flat =
            |v: Tensor<Self, 3>, c: usize| tensor::<Self, 3>(unit_dims_compact(prim(v))).reshape([b * t, c]);
        let acc = prim(flat(residual, n));
        match cublas::gemm_accumulate(acc, prim(flat(x, k)), prim(weight)) {
            Ok(sum) => tensor::<Self, 2>(sum).reshape([b, t, n]),
            Err((acc, x, weight)) => {
                let x = tensor::<Self, 2>(x).reshape([b, t, k]);
                tensor::<Self, 2>(acc).reshape([b, t, n])
                    + <Self as ModelKernels>::linear(x, tensor(weight), None)
            }
        }
    }

    fn attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Tensor<Self, 4> {
        let flash = (attention_mode() == AttentionMode::Flash)
            .then(|| Self::flash_attention(&q, &k, &v, keys))
            .flatten();
        match flash {
            Some((out, _)) => out,
            None => attention_default(q, k, v, keys),
        }
    }

    fn paged_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        pages: &crate::PageTable<'_, Self>,
        s: usize,
        keys: Option<&KeyRanges<Self>>,
    ) -> Tensor<Self, 4> {
        if attention_mode() == AttentionMode::Flash {
            let ranges = keys.map(|r| (r.lo.clone().into_primitive(), r.hi.clone().into_primitive()));
            let found = flash::forward_paged(
                &prim(q.clone()),
                [&prim(k.clone()), &prim(v.clone())],
                [
                    &pages.table.clone().into_primitive(),
                    &pages.shift.clone().into_primitive(),
                ],
                [pages.ld, pages.page_len],
                s,
                ranges.as_ref().map(|(lo, hi)| (lo, hi)),
            );
            match found {
                // [B, 1, H, hd] in memory, as the flash forward's output.
                Ok(out) => return tensor::<Self, 4>(out).swap_dims(1, 2),
                Err(why) => fell_back(Fallback::Flash, &why),
            }
        }
        crate::paged_attention_gathered(q, k, v, pages, s, keys)
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        match elementwise::rms_norm(&prim(x.clone()), &prim(weight.clone()), eps as f32) {
            Ok(y) => tensor(y),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                rms_norm_default(x, weight, eps)
            }
        }
    }

    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        dy: Tensor<Self, 3>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        match elementwise::rms_norm_backward(
            &prim(x.clone()),
            &prim(weight.clone()),
            &prim(dy.clone()),
            eps as f32,
        ) {
            Ok((dx, partial)) => {
                let dw = tensor::<Self, 2>(partial).sum_dim(0).reshape([weight.dims()[0]]);
                (tensor(dx), dw.cast(weight.dtype()))
            }
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::elementwise::rms_norm_backward_default(x, weight, dy, eps)
            }
        }
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        match elementwise::swiglu(&prim(gate.clone()), &prim(up.clone())) {
            Ok(y) => tensor(y),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::elementwise::swiglu_default(gate, up)
            }
        }
    }

    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        match elementwise::swiglu_backward(&prim(gate.clone()), &prim(up.clone()), &prim(dy.clone())) {
            Ok((d_gate, d_up)) => (tensor(d_gate), tensor(d_up)),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::elementwise::swiglu_backward_default(gate, up, dy)
            }
        }
    }

    fn rope(x: Tensor<Self, 4>, cos: &Tensor<Self, 3>, sin: &Tensor<Self, 3>) -> Tensor<Self, 4> {
        match elementwise::rope(&prim(x.clone()), &prim(cos.clone()), &prim(sin.clone())) {
            // The output comes as [B, T, H, hd]: the view the model's next reshape wants.
            Ok(y) => tensor::<Self, 4>(y).swap_dims(1, 2),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::elementwise::rope_default(x, cos, sin)
            }
        }
    }

    fn rope_qkv(
        y: Tensor<Self, 3>,
        bias: Option<Tensor<Self, 1>>,
        heads: [usize; 2],
        cos: &Tensor<Self, 3>,
        sin: &Tensor<Self, 3>,
        k_cache: Tensor<Self, 4>,
        v_cache: Tensor<Self, 4>,
        at: usize,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let (kc, vc) = (prim(k_cache), prim(v_cache));
        if !kc.can_mut() || !vc.can_mut() {
            // A buffer someone else holds is copied before it is written, as slice_assign does.
            let (kc, vc) = (tensor(kc), tensor(vc));
            return crate::elementwise::rope_qkv_default(y, bias, heads, cos, sin, kc, vc, at);
        }
        let b = bias.clone().map(prim);
        match elementwise::rope_qkv(
            &prim(y.clone()),
            b.as_ref(),
            heads,
            &prim(cos.clone()),
            &prim(sin.clone()),
            &kc,
            &vc,
            at,
        ) {
            // q comes as [B, T, H, hd]: the heads' view of it.
            Ok(q) => (tensor::<Self, 4>(q).swap_dims(1, 2), tensor(kc), tensor(vc)),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::elementwise::rope_qkv_default(y, bias, heads, cos, sin, tensor(kc), tensor(vc), at)
            }
        }
    }

    fn nf4_dequantize(w: &Nf4Tensor<Self>, dtype: DType) -> Tensor<Self, 2> {
        let codes = w.codes.clone().into_primitive();
        match nf4::dequantize(&codes, &prim(w.absmax.clone()), w.shape, dtype) {
            Ok(out) => tensor(out),
            Err(why) => {
                fell_back(Fallback::Elementwise, &why);
                crate::nf4::dequantize_default(w, dtype)
            }
        }
    }

    fn flash_attention(
        q: &Tensor<Self, 4>,
        k: &Tensor<Self, 4>,
        v: &Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>)> {
        let scale = flash::softmax_scale(q.dims()[3]);
        let ranges = keys.map(|r| (r.lo.clone().into_primitive(), r.hi.clone().into_primitive()));
        let found = flash::forward(
            &prim(q.clone()),
            &prim(k.clone()),
            &prim(v.clone()),
            ranges.as_ref().map(|(lo, hi)| (lo, hi)),
            scale,
        );
        match found {
            // The output comes as [B, T, H, hd]: the view the model's next reshape wants.
            Ok((out, lse)) => Some((tensor::<Self, 4>(out).swap_dims(1, 2), tensor(lse))),
            Err(why) => {
                fell_back(Fallback::Flash, &why);
                None
            }
        }
    }

    fn flash_attention_for_training(
        q: &Tensor<Self, 4>,
        k: &Tensor<Self, 4>,
        v: &Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>)> {
        if let Some(causal) = cudnn_mask(keys, q.dims()[2]) {
            let scale = flash::softmax_scale(q.dims()[3]);
            match cudnn::forward(
                &prim(q.clone()),
                &prim(k.clone()),
                &prim(v.clone()),
                causal,
                scale,
            ) {
                Ok((out, lse)) => return Some((tensor::<Self, 4>(out).swap_dims(1, 2), tensor(lse))),
                Err(why) => fell_back(Fallback::Cudnn, &why),
            }
        }
        Self::flash_attention(q, k, v, keys)
    }

    fn flash_attention_backward(
        q: &Tensor<Self, 4>,
        k: &Tensor<Self, 4>,
        v: &Tensor<Self, 4>,
        keys: Option<&KeyRanges<Self>>,
        out: &Tensor<Self, 4>,
        lse: &Tensor<Self, 4>,
        d_out: &Tensor<Self, 4>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>)> {
        let scale = flash::softmax_scale(q.dims()[3]);
        let (qp, kp, vp) = (prim(q.clone()), prim(k.clone()), prim(v.clone()));
        let (op, lp, dp) = (prim(out.clone()), prim(lse.clone()), prim(d_out.clone()));
        // dq comes as [B, T, H, hd]: back to [B, H, T, hd]; dk and dv per K/V head.
        let grads = |(dq, dk, dv)| Some((tensor::<Self, 4>(dq).swap_dims(1, 2), tensor(dk), tensor(dv)));
        if let Some(causal) = cudnn_mask(keys, q.dims()[2]) {
            match cudnn::backward(&qp, &kp, &vp, causal, &op, &lp, &dp, scale) {
                Ok(found) => return grads(found),
                Err(why) => fell_back(Fallback::Cudnn, &why),
            }
        }
        let ranges = keys.map(|r| (r.lo.clone().into_primitive(), r.hi.clone().into_primitive()));
        let ranges = ranges.as_ref().map(|(lo, hi)| (lo, hi));
        match flash::backward(&qp, &kp, &vp, ranges, &op, &lp, &dp, scale) {
            Ok(found) => grads(found),
            Err(why) => {
                fell_back(Fallback::Flash, &why);
                None
            }
        }
    }

    fn attention_probs(
        scores: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        scale: f64,
        p_dtype: FloatDType,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        if softmax::enabled() {
            let m = mask.clone().map(|m| m.into_primitive());
            match softmax::probs(&prim(scores.clone()), m.as_ref(), scale as f32, p_dtype.into()) {
                Ok((p, lse)) => return (tensor(p), tensor(lse)),
                Err(why) => fell_back(Fallback::AttentionSoftmax, &why),
            }
        }
        attention::probs_default(scores, mask, scale, p_dtype)
    }

    fn attention_probs_grad(
        scores: Tensor<Self, 4>,
        dp: Tensor<Self, 4>,
        lse: Tensor<Self, 4>,
        delta: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        scale: f64,
        ds_dtype: FloatDType,
        p_dtype: FloatDType,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        if softmax::enabled() {
            let m = mask.clone().map(|m| m.into_primitive());
            let fused = softmax::probs_grad(
                &prim(scores.clone()),
                &prim(dp.clone()),
                &prim(lse.clone()),
                &prim(delta.clone()),
                m.as_ref(),
                scale as f32,
                ds_dtype.into(),
                p_dtype.into(),
            );
            match fused {
                Ok((ds, p)) => return (tensor(ds), tensor(p)),
                Err(why) => fell_back(Fallback::AttentionSoftmax, &why),
            }
        }
        attention::probs_grad_default(scores, dp, lse, delta, mask, scale, ds_dtype, p_dtype)
    }

    fn prefix(x: Tensor<Self, 4>, dim: usize, len: usize) -> Tensor<Self, 4> {
        let mut t = prim(x);
        let shape = t.meta.shape_mut();
        assert!(
            dim < 4 && len <= shape[dim],
            "prefix of {len} along dim {dim} of {shape:?}"
        );
        // The same buffer and strides: only the positions before `len` are ever addressed.
        shape[dim] = len;
        tensor(t)
    }

    fn columns<const D: usize>(x: Tensor<Self, D>, start: usize, len: usize) -> Tensor<Self, D> {
        let mut t = prim(x);
        let n = t.meta.shape()[D - 1];
        assert!(start + len <= n, "columns {start}..{} of {n}", start + len);
        let step = (t.meta.strides()[D - 1] * t.dtype.size()) as u64;
        // Strides stay; the view starts `start` columns in and ends before the last row's
        // remaining columns, as burn's own slice views do.
        t.handle = t
            .handle
            .offset_start(start as u64 * step)
            .offset_end((n - start - len) as u64 * step);
        t.meta.shape_mut()[D - 1] = len;
        tensor(t)
    }

    fn decode_step(
        weights: &DecodeWeights<'_, Self>,
        x: DecodeInputs<'_, Self>,
        caches: CacheBuffers<Self>,
        state: &mut crate::StepState,
    ) -> (Option<Tensor<Self, 2>>, CacheBuffers<Self>) {
        if !decode::enabled() {
            return (None, caches);
        }
        let p = |t: &Tensor<Self, 1>| prim(t.clone());
        let m = |t: &Tensor<Self, 2>| prim(t.clone());
        let w = decode::Weights {
            embed: m(weights.embed),
            layers: weights
                .layers
                .iter()
                .map(|l| decode::Layer {
                    input_norm: p(l.input_norm),
                    qkv: l.qkv.iter().map(|&(w, b)| (m(w), b.map(p))).collect(),
                    o_proj: m(l.o_proj),
                    post_norm: p(l.post_norm),
                    gate_up: l.gate_up.iter().map(|&(w, b)| (m(w), b.map(p))).collect(),
                    down_proj: m(l.down_proj),
                })
                .collect(),
            norm: p(weights.norm),
            lm_head: m(&weights.lm_head),
            eps: weights.eps,
            heads: weights.heads,
            hd: weights.head_dim,
        };
        let inputs = decode::Inputs {
            ids: x.ids.into_primitive(),
            cos: prim(x.cos.clone()),
            sin: prim(x.sin.clone()),
            keys: x
                .keys
                .map(|r| (r.lo.clone().into_primitive(), r.hi.clone().into_primitive())),
            at: x.at,
            table: x.pages.table.clone().into_primitive(),
            ld: x.pages.ld,
            shift: x.pages.shift.clone().into_primitive(),
            page_len: x.pages.page_len,
        };
        let bufs: Vec<_> = caches.into_iter().map(|(k, v)| (prim(k), prim(v))).collect();
        let found = decode::step(&w, &inputs, &bufs, state);
        let caches = bufs.into_iter().map(|(k, v)| (tensor(k), tensor(v))).collect();
        match found {
            Ok(logits) => (Some(tensor(logits)), caches),
            Err(why) => {
                fell_back(Fallback::Decode, &why);
                (None, caches)
            }
        }
    }

    fn sample_rows(logits: Tensor<Self, 2>, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>, String> {
        let Some(ids) = sample_on_device(&logits, vocab, rows) else {
            return crate::sample::sample_rows_default(logits, vocab, rows);
        };
        let ids = Tensor::<Self, 1, Int>::from_primitive(ids)
            .try_into_data()
            .map_err(|e| format!("sampled ids to host: {e:?}"))?;
        ids.iter::<i64>()
            .map(|t| u32::try_from(t).map_err(|_| format!("sampled id {t}")))
            .collect()
    }

    fn sample_rows_ahead(
        logits: Tensor<Self, 2>,
        vocab: usize,
        rows: &[RowSampling],
    ) -> Result<crate::SampledIds<Self>, String> {
        let Some(ids) = sample_on_device(&logits, vocab, rows) else {
            return crate::sample::sample_rows_ahead_default(logits, vocab, rows);
        };
        let read = sample::read_ahead(&ids)?;
        Ok(crate::SampledIds {
            ids: Tensor::from_primitive(ids),
            read,
        })
    }
}

/// `rows`' draws from `logits` by the sampling kernel (i32 [B]), or None where it cannot
/// run (a note the first time): the caller then draws on the host.
fn sample_on_device<F, I, BT>(
    logits: &Tensor<burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>, 2>,
    vocab: usize,
    rows: &[RowSampling],
) -> Option<CudaTensor>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    let device = logits.device();
    let params = Tensor::<burn_cubecl::CubeBackend<_, F, I, BT>, 2>::from_data(
        burn::tensor::TensorData::new(sample::params(rows), [rows.len(), 4]),
        burn::tensor::TensorCreationOptions::new(device).with_dtype(DType::F32),
    );
    sample::sample_rows(&prim(logits.clone()), vocab, &prim(params))
        .map_err(|why| fell_back(Fallback::Sampling, &why))
        .ok()
}

/// The loss's passes over logits and the AdamW update as fused kernels.
impl<F, I, BT> TrainKernels for burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn concat_f32(parts: Vec<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        if parts.len() < 2 {
            return concat_f32_default(parts);
        }
        let prims: Vec<FloatTensor<Self>> = parts.iter().cloned().map(prim).collect();
        match optim::concat_f32(&prims) {
            Ok(out) => tensor(out),
            Err(why) => {
                fell_back(Fallback::AdamW, &why);
                concat_f32_default(parts)
            }
        }
    }

    fn sum_squares(x: Tensor<Self, 1>) -> Tensor<Self, 1> {
        match optim::sum_squares(&prim(x.clone())) {
            Ok(total) => tensor(total),
            Err(why) => {
                fell_back(Fallback::AdamW, &why);
                x.square().sum()
            }
        }
    }

    fn softmax_stats(
        z: Tensor<Self, 2>,
        t: f64,
        limit: usize,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2>) {
        match logits::stats(&prim(z.clone()), t as f32, limit) {
            Ok((m, s, st)) => (tensor(m), tensor(s), tensor(st)),
            Err(why) => {
                fell_back(Fallback::LossSoftmax, &why);
                crate::logits::stats_default(z, t, limit)
            }
        }
    }

    fn softmax_grad(
        z: Tensor<Self, 2>,
        max: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Option<Tensor<Self, 2>>,
        t: f64,
        limit: usize,
        ids: Tensor<Self, 2, Int>,
        values: Tensor<Self, 2>,
        dtype: FloatDType,
    ) -> Tensor<Self, 2> {
        let found = logits::grad(
            &prim(z.clone()),
            &prim(max.clone()),
            &prim(a.clone()),
            b.clone().map(prim).as_ref(),
            t as f32,
            limit,
            &ids.clone().into_primitive(),
            &prim(values.clone()),
            dtype.into(),
        );
        match found {
            Ok(g) => tensor(g),
            Err(why) => {
                fell_back(Fallback::LossSoftmax, &why);
                crate::logits::grad_default(z, max, a, b, t, limit, ids, values, dtype)
            }
        }
    }

    fn adamw(
        p: Tensor<Self, 1>,
        g: Tensor<Self, 1>,
        m: Tensor<Self, 1>,
        v: Tensor<Self, 1>,
        c: AdamWScalars,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let (p, g, m, v) = (prim(p), prim(g), prim(m), prim(v));
        if let Err(why) = optim::adamw_ready(&p, &g, &m, &v) {
            fell_back(Fallback::AdamW, &why);
            return adamw_default(tensor(p), tensor(g), tensor(m), tensor(v), c);
        }
        // Handed over, not cloned: a buffer held only here is updated in place.
        match optim::adamw(p, g, m, v, c) {
            Ok((p, m, v)) => (tensor(p), tensor(m), tensor(v)),
            // Inputs checked and the kernel loaded: a failed launch is a failed device.
            Err(why) => panic!("AdamW kernel: {why}"),
        }
    }
}

/// Exact-size buffers and trims that keep freed memory in the driver's pool.
impl<F, I, BT> MemoryPolicy for burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn trim_memory(device: &Self::Device) {
        if let Err(e) = pool::retain_freed_memory(device) {
            // Still correct without it, only slower: pages come back from the driver.
            static NOTED: std::sync::Once = std::sync::Once::new();
            NOTED.call_once(|| eprintln!("note: freed GPU memory is returned to the driver ({e})"));
        }
        <Self as burn::tensor::backend::Backend>::memory_cleanup(device)
    }

    /// Into pinned host memory, copied on a stream of its own ([`offload`]).
    fn park<const D: usize>(x: Tensor<Self, D>) -> Result<crate::Parked<Self>, String> {
        let (device, shape) = (x.device(), x.dims().to_vec());
        let pinned = offload::park(prim(x))?;
        Ok(crate::Parked {
            device,
            shape,
            host: crate::offload::HostCopy::Pinned(pinned),
        })
    }

    fn fetch(parked: crate::Parked<Self>) -> Result<crate::Fetched<Self>, String> {
        let crate::offload::HostCopy::Pinned(pinned) = parked.host else {
            return crate::offload::fetch_default(parked);
        };
        let float = FloatDType::from(pinned.dtype());
        let tensor = <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_empty(
            parked.shape.clone().into(),
            &parked.device,
            float,
        );
        let arrival = offload::fetch(pinned, &tensor)?;
        Ok(crate::Fetched {
            tensor,
            shape: parked.shape,
            arrival: Some(arrival),
        })
    }

    fn land<const D: usize>(mut fetched: crate::Fetched<Self>) -> Result<Tensor<Self, D>, String> {
        if let Some(arrival) = fetched.arrival.take() {
            offload::land(arrival)?;
        }
        crate::offload::land_default(fetched)
    }

    fn read_parked(parked: &crate::Parked<Self>) -> Result<burn::tensor::TensorData, String> {
        match &parked.host {
            crate::offload::HostCopy::Pinned(pinned) => Ok(burn::tensor::TensorData::from_bytes_vec(
                offload::read(pinned)?,
                parked.shape.clone(),
                pinned.dtype(),
            )),
            _ => crate::offload::read_default(parked),
        }
    }

    /// cubecl's persistent memory, enforced for the process (its `cubecl.toml`'s other settings
    /// kept): every buffer an exact-size `cuMemAllocAsync`, a freed one reused for the same size
    /// and handed back to the driver's pool (kept there, [`MemoryPolicy::trim_memory`]) by the
    /// cleanup. cubecl reads the setting when it first makes the device's client.
    fn exact_allocations() {
        use burn_cubecl::cubecl::config::memory::PersistentMemory;
        use burn_cubecl::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let mut slot = CubeClRuntimeConfig::storage().lock();
        match slot.as_ref() {
            None => {
                let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
                config.memory.persistent_memory = PersistentMemory::Enforced;
                *slot = Some(std::sync::Arc::new(config));
            }
            Some(config) if matches!(config.memory.persistent_memory, PersistentMemory::Enforced) => {}
            // Still correct, only more memory: cubecl's pages as before.
            Some(_) => eprintln!("note: GPU memory was set up before training; allocations stay paged"),
        }
    }
}

/// The CUDA kernels a [`Kernels`] method may fall back from (to burn's ops or the blockwise
/// attention), each noted once on stderr with the first reason.
#[derive(Debug, Clone, Copy)]
pub enum Fallback {
    Flash,
    /// cuDNN's attention, to the flash kernels.
    Cudnn,
    AttentionSoftmax,
    LossSoftmax,
    AdamW,
    Elementwise,
    Sampling,
    /// The fused decoding step, to the op-by-op path.
    Decode,
}

const FALLBACKS: usize = 8;

static FELL_BACK: [std::sync::atomic::AtomicBool; FALLBACKS] =
    [const { std::sync::atomic::AtomicBool::new(false) }; FALLBACKS];

/// Whether a CUDA [`Kernels`] method has fallen back from `which` kernels in this process: for
/// tests that must know the kernel ran, and tools that report it.
pub fn has_fallen_back(which: Fallback) -> bool {
    FELL_BACK[which as usize].load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    static FELL_BACK_HERE: [std::cell::Cell<bool>; FALLBACKS] =
        const { [const { std::cell::Cell::new(false) }; FALLBACKS] };
}

/// [`has_fallen_back`] on the calling thread alone (a method falls back on its caller's
/// thread): what a test checks of its own calls, whatever the tests beside it did.
pub fn has_fallen_back_on_this_thread(which: Fallback) -> bool {
    FELL_BACK_HERE.with(|f| f[which as usize].get())
}

fn fell_back(which: Fallback, why: &str) {
    static NOTED: [std::sync::Once; FALLBACKS] = [const { std::sync::Once::new() }; FALLBACKS];
    FELL_BACK[which as usize].store(true, std::sync::atomic::Ordering::Relaxed);
    FELL_BACK_HERE.with(|f| f[which as usize].set(true));
    let what = match which {
        Fallback::Flash => "attention without the flash kernels",
        Fallback::Cudnn => "training attention on the flash kernels, not cuDNN",
        Fallback::AttentionSoftmax => "attention softmax on burn's ops",
        Fallback::LossSoftmax => "the loss's softmax on burn's ops",
        Fallback::AdamW => "AdamW (update, flat groups or gradient norm) on burn's ops",
        Fallback::Elementwise => "RMSNorm, SwiGLU, RoPE and NF4 dequantization on burn's ops",
        Fallback::Sampling => "token sampling on the host",
        Fallback::Decode => "decoding steps op by op",
    };
    NOTED[which as usize].call_once(|| eprintln!("note: {what} ({why}); later fallbacks are silent"));
}
