//! One optimizer step: micro-batches forward block by block, the chunked loss at the head,
//! backward block by block (recomputing each block when asked), one clipped AdamW update.

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use distill_core::Recipe;
use distill_data::examples::{self as data, Example, IGNORE, Row};
use distill_kernels::KeyRanges;
use distill_models::transformer::{Context, DecoderLayer, token_chunks};
use distill_models::{CausalLm, Kernels};

use super::offload::BlockInputs;
use super::teacher::{Teacher, teacher_targets};
use super::{Ad, TrainError};
use crate::lora;
use crate::loss::{HeadWeight, LossConfig, chunked_loss};
use crate::optim::{AdamW, AdamWConfig};
use crate::parallel::Collective;
use crate::params::{GradStore, collect_grads, param_infos};

/// A block's input leaf and output, with the graph between them kept for backward.
type BlockGraph<B> = (Tensor<Ad<B>, 3>, Tensor<Ad<B>, 3>);

/// The student as training sees it: LoRA adapters on a frozen model when the recipe enables
/// [lora], else every parameter trainable in f32.
pub fn trainable_student<B: Kernels>(
    student: CausalLm<Ad<B>>,
    recipe: &Recipe,
    device: &B::Device,
) -> CausalLm<Ad<B>>
where
    Ad<B>: Kernels + BackendTypes<Device = B::Device>,
{
    if recipe.lora.enabled {
        lora::add_lora(student, &recipe.lora, recipe.train.seed, device)
    } else {
        lora::full_finetune(student)
    }
}

/// AdamW over the trainable parameters, with weight decay on matrices only.
pub fn new_optimizer<B: Kernels>(model: &CausalLm<Ad<B>>, t: &distill_core::recipe::TrainSection) -> AdamW<B>
where
    Ad<B>: Kernels,
{
    let decayed = param_infos(model)
        .iter()
        .filter(|p| p.trainable && p.shape.len() >= 2)
        .map(|p| p.id)
        .collect();
    AdamW::<B>::new(AdamWConfig::from_recipe(t), decayed).offloading(t.offload_optimizer)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Means per loss token.
    pub loss: f64,
    pub ce: f64,
    pub kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step's rows (padding included), and those carrying a loss.
    pub tokens: usize,
    pub loss_tokens: usize,
    /// False when the loss or the gradient was not finite: the model was left as it was.
    pub applied: bool,
}

/// The phases of a step, in order; [`optimizer_step`] calls its phase hook at the end of each
/// (the first four once per micro-batch).
pub const PHASES: [&str; 7] = [
    "inputs",
    "forward",
    "teacher",
    "loss",
    "backward",
    "grad_norm",
    "optimizer",
];

/// Called with a phase's name (one of [`PHASES`]) when the step has queued that phase's work.
/// `distill bench --profile` syncs the device there and times each phase; training passes
/// [`no_phases`].
pub type PhaseHook<'a> = &'a mut dyn FnMut(&'static str);

/// The phase hook that does nothing.
pub fn no_phases(_: &'static str) {}

/// One optimizer step on `rows`, exactly as `distill train` runs each step (and `distill
/// bench` times it): micro-batches of [train] micro_batch rows, gradients of the mean loss
/// over the step's loss tokens, global-norm clipping, one AdamW update at `lr`.
///
/// `rows` are this worker's share of the step ([`crate::parallel::shard`] of the dataset's,
/// or the samples it drew on-policy); with several workers in `group`, the counts, the
/// gradients and the loss sums are summed over them before the update, which is then the
/// same everywhere ([`crate::parallel`]). With [`crate::parallel::Solo`], the whole step.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B: Kernels>(
    model: CausalLm<Ad<B>>,
    opt: &mut AdamW<B>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    lr: f64,
    device: &B::Device,
    group: &dyn Collective<B>,
    phase: PhaseHook,
) -> Result<(CausalLm<Ad<B>>, StepOutcome), TrainError>
where
    Ad<B>: Kernels,
{
    let t = &recipe.train;
    let counts = [
        rows.iter()
            .map(|r| r.labels.iter().filter(|&&l| l != IGNORE).count())
            .sum::<usize>() as f64,
        rows.iter().map(|r| r.input_ids.len()).sum::<usize>() as f64,
    ];
    let [loss_tokens, tokens] = if group.world() > 1 {
        let all = group.all_reduce_host(&counts)?;
        [all[0] as usize, all[1] as usize]
    } else {
        counts.map(|c| c as usize)
    };
    let scale = 1.0 / loss_tokens.max(1) as f64;
    let mut grads = GradStore::<B>::default();
    let mut sums = [0.0; 3];
    for micro in rows.chunks(t.micro_batch) {
        let s = micro_step(
            &model, teacher, micro, loss_cfg, recipe, scale, &mut grads, device, phase,
        )?;
        sums = [sums[0] + s.0, sums[1] + s.1, sums[2] + s.2];
    }
    if group.world() > 1 {
        sums = align_gradients(&model, &mut grads, sums, group, device)?;
    }
    let n = loss_tokens.max(1) as f64;
    let (loss, ce, kl) = (sums[0] / n, sums[1] / n, sums[2] / n);
    // The activations are gone: what they freed goes back before the optimizer's groups are
    // made, once the device has finished with it. Freed while the backward was still queued,
    // the driver's pool grew for the groups' 256 MiB buffers instead of reusing it (1.5B full
    // fine-tuning: 31.4 -> 30.2 GiB reserved; a failed sync shows at the next operation).
    let _ = B::sync(device);
    B::trim_memory(device);
    // The trainable parameters as flat groups: the norm and the update both read them.
    let mut flat = opt.gather::<Ad<B>, _>(&model, grads);
    if group.world() > 1 {
        flat.reduce_to_owners(group)?;
    }
    // And the per-parameter gradients, copied into the groups, before the update's buffers.
    B::trim_memory(device);
    let grad_norm = flat.grad_norm(group)?;
    phase("grad_norm");
    let applied = loss.is_finite() && grad_norm.is_finite();
    let mut model = model;
    if applied {
        // Global-norm clipping: AdamW scales the gradients as it reads them.
        let clip = if t.max_grad_norm > 0.0 && grad_norm > t.max_grad_norm {
            t.max_grad_norm / grad_norm
        } else {
            1.0
        };
        model = opt.apply::<Ad<B>, _>(model, flat, lr, clip, group)?;
    }
    // And the gradients' groups and last step's parameters before the next forward.
    B::trim_memory(device);
    phase("optimizer");
    let outcome = StepOutcome {
        loss,
        ce,
        kl,
        grad_norm,
        tokens,
        loss_tokens,
        applied,
    };
    Ok((model, outcome))
}

/// Makes every worker's gradients cover the same parameters, so that their flat groups line
/// up for the sums: zeros where another worker has a gradient and this one none (its rows
/// carried no loss). A parameter no worker has a gradient for stays without one, and so is
/// not updated, as on one worker. The loss sums (total, ce, kl) travel in the same exchange;
/// returns them summed over the workers.
fn align_gradients<B: Kernels>(
    model: &CausalLm<Ad<B>>,
    grads: &mut GradStore<B>,
    sums: [f64; 3],
    group: &dyn Collective<B>,
    device: &B::Device,
) -> Result<[f64; 3], TrainError>
where
    Ad<B>: Kernels,
{
    let params = grads.presence::<Ad<B>, _>(model);
    let here: Vec<f64> = sums
        .into_iter()
        .chain(params.iter().map(|&(_, _, has)| f64::from(u8::from(has))))
        .collect();
    let summed = group.all_reduce_host(&here)?;
    let (totals, anywhere) = summed.split_at(3);
    for (&(id, n, has), &count) in params.iter().zip(anywhere) {
        if !has && count > 0.0 {
            grads.add(id, Tensor::zeros([n], (device, burn::tensor::DType::F32)));
        }
    }
    Ok([totals[0], totals[1], totals[2]])
}

/// The rows of optimizer step `step`: its slice of the (seeded, per-epoch) packed order.
/// The last step of an epoch wraps around to the epoch's first rows to fill its batch, so
/// every step sees the same number of rows.
pub(super) fn step_rows(
    examples: &[Example],
    t: &distill_core::recipe::TrainSection,
    step: usize,
    steps_per_epoch: usize,
    rows_per_step: usize,
    pad_id: u32,
    cache: &mut Option<(u64, Vec<Row>)>,
) -> Vec<Row> {
    let epoch = (step / steps_per_epoch) as u64;
    if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
        *cache = Some((
            epoch,
            data::epoch_rows(examples, t.seed, epoch, t.seq_len, t.packing, pad_id),
        ));
    }
    let rows = &cache.as_ref().expect("filled above").1;
    let start = (step % steps_per_epoch) * rows_per_step;
    rows.iter()
        .cycle()
        .skip(start)
        .take(rows_per_step.min(rows.len().max(1)))
        .cloned()
        .collect()
}

/// One micro-batch: forward without a graph, the head with its chunked loss, then block by
/// block backward. Adds gradients of `scale * loss` to `grads`; returns the loss sums
/// (total, ce, kl) over its tokens.
#[allow(clippy::too_many_arguments)]
fn micro_step<B: Kernels>(
    model: &CausalLm<Ad<B>>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    scale: f64,
    grads: &mut GradStore<B>,
    device: &B::Device,
    phase: PhaseHook,
) -> Result<(f64, f64, f64), TrainError>
where
    Ad<B>: Kernels,
{
    let (ids, docs, positions, labels) = batch_tensors::<B>(rows, device);
    let Some(positions) = positions else {
        return Ok((0.0, 0.0, 0.0));
    };
    let ctx = Context::<B>::packed(&model.rotary, &docs, device);
    let ctx_ad = Context::<Ad<B>> {
        cos: Tensor::from_inner(ctx.cos.clone()),
        sin: Tensor::from_inner(ctx.sin.clone()),
        keys: ctx.keys.clone().map(KeyRanges::from_inner),
    };
    phase("inputs");
    let layers = &model.model.layers;

    // Forward: keep block inputs only (or each block's graph when not recomputing).
    let mut xs = BlockInputs::<B>::new(recipe.train.recompute && recipe.train.offload_block_inputs);
    let mut kept: Vec<BlockGraph<B>> = Vec::new();
    let (chunk, every) = (
        recipe.train.mlp_chunk_tokens,
        recipe.train.block_inputs_every.max(1),
    );
    let mut x = model.valid().embed(ids.clone()); // [R, T, C]
    for (i, layer) in layers.iter().enumerate() {
        x = if recipe.train.recompute {
            if i % every == 0 {
                xs.push(x.clone()).map_err(TrainError::Offload)?;
            }
            layer.valid().forward_mlp_chunked(x, &ctx, chunk)
        } else {
            let leaf = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
            let y = layer.forward(leaf.clone(), &ctx_ad, None);
            let out = y.clone().inner();
            kept.push((leaf, y));
            out
        };
    }
    // The forward's temporaries (kept for reuse at their own sizes) go back for the loss's.
    B::trim_memory(device);
    phase("forward");

    // Head: final norm with a graph; the loss in chunks with their own backward passes.
    let x_last = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
    let h = model.model.norm.forward(x_last.clone()); // [R, T, C]
    let h_sel = select_positions(h, &Tensor::<Ad<B>, 1, Int>::from_inner(positions.clone())); // [N, C]
    let teacher_targets = teacher_targets(
        teacher,
        ids.clone(),
        &docs,
        &positions,
        &labels,
        rows,
        model.config.vocab_size,
    )?;
    phase("teacher");
    let head_param = head_param(model);
    let want_w = head_param.as_ref().is_some_and(|(_, trainable)| *trainable);
    let out = chunked_loss::<Ad<B>>(
        h_sel.clone().inner(),
        head_weight(model),
        labels,
        &teacher_targets,
        loss_cfg,
        recipe.loss.chunk_tokens,
        want_w,
        scale,
    );
    phase("loss");
    let head_grads = (h_sel * Tensor::from_inner(out.grad_hidden)).sum().backward();
    collect_grads(&model.model.norm, &head_grads, grads);
    let mut g = x_last.grad(&head_grads).expect("x_last is a leaf");
    if let (Some((id, _)), Some(gw)) = (head_param, out.grad_weight) {
        let n = gw.shape().num_elements();
        grads.add(id, gw.reshape([n]));
    }

    // Backward through the blocks, last first. Each block's activations, freed as it goes,
    // are handed back for the gradients' buffers, which are of other sizes: kept for reuse at
    // their own sizes, they stayed reserved beside the gradients (1.5B full fine-tuning: 40.5
    // -> 35.2 GiB peak). The loss's chunk buffers go first.
    B::trim_memory(device);
    // The inputs of the blocks from the last kept input up to the current block, recomputed
    // from it (just the kept input when every block's is kept); the last is the current one's.
    let mut segment: Vec<Tensor<B, 3>> = Vec::new();
    for (i, layer) in layers.iter().enumerate().rev() {
        let (leaf, y) = if recipe.train.recompute {
            if segment.is_empty() {
                segment.push(xs.pop().map_err(TrainError::Offload)?);
                for earlier in &layers[i - i % every..i] {
                    let x = segment.last().expect("the kept input").clone();
                    segment.push(earlier.valid().forward_mlp_chunked(x, &ctx, chunk));
                }
            }
            let x = segment.pop().expect("block i's input");
            let leaf = Tensor::<Ad<B>, 3>::from_inner(x).require_grad();
            let [r, t, _] = leaf.dims();
            if token_chunks(r * t, chunk).len() > 1 {
                // The MLP half first, chunk by chunk, each chunk's graph gone before the next;
                // then the attention half with the gradient at its output.
                let h = layer.attention_residual(leaf.clone(), &ctx_ad, None);
                g = mlp_backward_chunked(layer, h.clone().inner(), g, chunk, grads);
                (leaf, h)
            } else {
                let y = layer.forward(leaf.clone(), &ctx_ad, None);
                (leaf, y)
            }
        } else {
            kept.pop().expect("one graph per layer")
        };
        let block_grads = (y * Tensor::from_inner(g)).sum().backward();
        collect_grads(layer, &block_grads, grads);
        g = leaf.grad(&block_grads).expect("block input is a leaf");
        drop((leaf, block_grads));
        B::trim_memory(device);
    }
    if param_is_trainable(&model.model.embed_tokens.weight) {
        let e = model.embed(Tensor::<Ad<B>, 2, Int>::from_inner(ids));
        let embed_grads = (e * Tensor::from_inner(g)).sum().backward();
        collect_grads(&model.model.embed_tokens, &embed_grads, grads);
    }
    phase("backward");
    Ok((out.total, out.ce, out.kl))
}

/// Backward through `layer`'s MLP half (h -> h + mlp(norm(h))) at h [R, T, C], given the
/// gradient g at its output, over at most `chunk` tokens at a time: adds the parameters'
/// gradients to `grads`, returns the gradient at h [R, T, C].
fn mlp_backward_chunked<B: Kernels>(
    layer: &DecoderLayer<Ad<B>>,
    h: Tensor<B, 3>,
    g: Tensor<B, 3>,
    chunk: usize,
    grads: &mut GradStore<B>,
) -> Tensor<B, 3>
where
    Ad<B>: Kernels,
{
    let [r, t, c] = h.dims();
    let (h, g) = (h.reshape([1, r * t, c]), g.reshape([1, r * t, c]));
    let parts = token_chunks(r * t, chunk)
        .into_iter()
        .map(|s| {
            let at = [0..1, s, 0..c];
            let leaf = Tensor::<Ad<B>, 3>::from_inner(h.clone().slice(at.clone())).require_grad();
            let out = layer.mlp_residual(leaf.clone());
            let chunk_grads = (out * Tensor::from_inner(g.clone().slice(at))).sum().backward();
            collect_grads(layer, &chunk_grads, grads);
            leaf.grad(&chunk_grads).expect("the chunk is a leaf")
        })
        .collect();
    Tensor::cat(parts, 1).reshape([r, t, c])
}

fn param_is_trainable<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> bool {
    p.val().is_require_grad()
}

/// The output projection as stored: lm_head [C, V], or the tied embeddings [V, C].
fn head_weight<B: Backend>(model: &CausalLm<Ad<B>>) -> HeadWeight<B> {
    match &model.lm_head {
        Some(head) => HeadWeight::Cv(
            head.weight
                .dense()
                .expect("the LM head is never quantized")
                .val()
                .inner(),
        ),
        None => HeadWeight::Vc(model.model.embed_tokens.weight.val().inner()),
    }
}

/// The output projection's parameter id and whether it trains.
fn head_param<B: Backend>(model: &CausalLm<Ad<B>>) -> Option<(burn::module::ParamId, bool)> {
    let p = match &model.lm_head {
        Some(head) => head.weight.dense()?,
        None => &model.model.embed_tokens.weight,
    };
    Some((p.id, param_is_trainable(p)))
}

/// [R, T, C] -> [N, C]: the rows at flattened `positions`.
pub(super) fn select_positions<B: Backend>(h: Tensor<B, 3>, positions: &Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [r, t, c] = h.dims();
    h.reshape([r * t, c]).select(0, positions.clone())
}

fn batch_ids<B: Backend>(rows: &[Row], device: &B::Device) -> Tensor<B, 2, Int> {
    let t = rows[0].input_ids.len();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.input_ids.iter().map(|&x| i64::from(x)))
        .collect();
    Tensor::from_data(TensorData::new(ids, [rows.len(), t]), device)
}

/// Each token's document as attention sees it: the row's trailing padding (whose index is
/// past the last document's, `Row::docs`) folded into its last document. Causal attention
/// never lets a token see a later one and padding carries no loss, so every real token
/// computes the same values and gradients; a row of one document then has a plain causal
/// mask, which cuDNN's fused attention takes, where padding of its own kept it on the flash
/// kernels.
pub(crate) fn attention_docs(row: &Row) -> Vec<u32> {
    let Some(last) = (row.keys.len() as u32).checked_sub(1) else {
        return row.docs.clone();
    };
    row.docs.iter().map(|&d| d.min(last)).collect()
}

/// ids [R, T], docs as attention sees them ([`attention_docs`]), positions with a label
/// (flattened index) [N] or None if there are none, and those labels [N].
#[allow(clippy::type_complexity)]
pub(crate) fn batch_tensors<B: Backend>(
    rows: &[Row],
    device: &B::Device,
) -> (
    Tensor<B, 2, Int>,
    Vec<Vec<u32>>,
    Option<Tensor<B, 1, Int>>,
    Tensor<B, 1, Int>,
) {
    let t = rows[0].input_ids.len();
    let docs: Vec<Vec<u32>> = rows.iter().map(attention_docs).collect();
    let (mut pos, mut lab) = (Vec::new(), Vec::new());
    for (ri, row) in rows.iter().enumerate() {
        for (i, &l) in row.labels.iter().enumerate() {
            if l != IGNORE {
                pos.push((ri * t + i) as i64);
                lab.push(l);
            }
        }
    }
    let n = pos.len();
    let positions = (n > 0).then(|| Tensor::from_data(TensorData::new(pos, [n]), device));
    (
        batch_ids(rows, device),
        docs,
        positions,
        Tensor::from_data(TensorData::new(lab, [n]), device),
    )
}

/// Mean loss on the held-out rows (no gradients), or None without held-out data.
pub(super) fn held_out_loss<B: Kernels>(
    model: &CausalLm<Ad<B>>,
    teacher: &Teacher<B>,
    held_out: &[Example],
    loss_cfg: &LossConfig,
    recipe: &Recipe,
    pad_id: u32,
    device: &B::Device,
) -> Result<Option<f64>, TrainError>
where
    Ad<B>: Kernels,
{
    let rows = data::pack(held_out, recipe.train.seq_len, recipe.train.packing, pad_id);
    mean_loss(
        &model.valid(),
        teacher,
        &rows,
        loss_cfg,
        recipe.train.micro_batch,
        device,
    )
}

/// Mean loss per loss token of `model` on `rows`, `micro_batch` rows at a time, without
/// gradients; None when the rows carry no loss.
pub(crate) fn mean_loss<B: Kernels>(
    model: &CausalLm<B>,
    teacher: &Teacher<B>,
    rows: &[Row],
    loss_cfg: &LossConfig,
    micro_batch: usize,
    device: &B::Device,
) -> Result<Option<f64>, TrainError> {
    let (mut total, mut tokens) = (0.0, 0usize);
    for micro in rows.chunks(micro_batch.max(1)) {
        let (ids, docs, positions, labels) = batch_tensors::<B>(micro, device);
        let Some(positions) = positions else { continue };
        let h = select_positions(model.hidden_states_packed(ids.clone(), &docs), &positions); // [N, C]
        let width = model.config.vocab_size;
        let targets = teacher_targets(teacher, ids, &docs, &positions, &labels, micro, width)?;
        let n = positions.dims()[0];
        let logits = model.logits(h.unsqueeze::<3>()).squeeze_dim(0);
        let sums = crate::loss::token_loss(logits, labels, &targets, loss_cfg);
        total += sums.total.into_scalar().elem::<f64>();
        tokens += n;
    }
    Ok((tokens > 0).then(|| total / tokens as f64))
}
