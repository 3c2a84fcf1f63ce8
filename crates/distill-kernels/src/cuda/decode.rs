//! A whole decoding step as one task on cubecl's device thread
//! ([`crate::ModelKernels::decode_step`]): every kernel and GEMM of the step, issued back to
//! back on cubecl's stream with pointers resolved once.
//!
//! Why: op by op, each of a step's launches (14 a layer) went through burn's tensor ops, an
//! allocation, a task sent to the device thread and its buffers' lookups there; at small batch
//! the GPU waited on that host work, not on memory. Here the host work of a step is a few
//! allocations, one task and the launches themselves.
//!
//! What runs is the op-by-op path's kernels, in its order, with its arguments: the
//! embedding gather, then per layer RMSNorm, the q/k/v GEMM, `rope_qkv` (bias, rotation,
//! the cache write), attention over positions 0..=at (`flash_decode` over splits of the
//! keys, then `flash_decode_combine`), both through the paged cache's page table,
//! the output projection accumulated into the residual (cuBLAS, beta 1), RMSNorm, the
//! gate/up GEMM, SwiGLU and the down projection accumulated into the residual; then the
//! final norm and the LM head. So the logits equal the op-by-op path's bit for bit (the GPU
//! tests check that).
//!
//! The launches go through an `Issuer` (`graph.rs`): by default a cache's steps are
//! replayed from a CUDA graph ([`Mode::Graph`]), with the step's work buffers kept by the
//! cache (`State`) so that they are the same every step; `DISTILL_DECODE=direct` issues
//! each launch itself.
//!
//! Inputs it does not take (not bf16, weights cuBLAS cannot read in place, a head dim the
//! flash kernels lack, more than 16 query heads a K/V head, pools held elsewhere, cuBLAS or
//! the flash kernels switched off) get `Err`, and the caller runs the step op by op.
//! `DISTILL_DECODE=ops` does so always.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::server::Binding;
use burn_cubecl::tensor::CubeTensor;

use crate::StepState;

use super::cublas::{self, RowGemm, WeightLayout};
use super::elementwise::{self, RopeQkv};
use super::flash::{self, Forward, Paging, Shape};
use super::graph::{Issue, Issuer, Path, Replays};
use super::nvrtc::{self, Arg, Call, Launch};
use super::{stream, timing};

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
typedef unsigned short bf16_t;
typedef long long i64;

/* out [rows, c] = the rows of table [V, c] (rows ld elements apart) that ids [rows] name. */
extern "C" __global__ void embed_rows(const int* ids, const bf16_t* table, bf16_t* out, int rows, i64 c, i64 ld)
{
    const i64 n = (i64)rows * c;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / c;
        out[i] = table[(i64)ids[r] * ld + (i - r * c)];
    }
}
"#;

fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "decode".into(),
        sources: &[SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["embed_rows"],
        dynamic_smem: 0,
    }
}

/// How decoding steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Op by op, through burn's tensor ops (`DISTILL_DECODE=ops`).
    Ops,
    /// Fused: one device-thread task issues every launch (`DISTILL_DECODE=direct`).
    Direct,
    /// Fused, and replayed from a CUDA graph captured once per cache and batch: the
    /// default.
    Graph,
}

static MODE: AtomicU8 = AtomicU8::new(0); // 0: not read yet, else 1 + the mode's index
const MODES: [Mode; 3] = [Mode::Ops, Mode::Direct, Mode::Graph];

/// How decoding steps run: `DISTILL_DECODE` (`ops`, `direct` or `graph`, the default) or
/// what [`set_mode`] set.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let mode = match std::env::var("DISTILL_DECODE").as_deref() {
                Ok("ops") => Mode::Ops,
                Ok("direct") => Mode::Direct,
                Ok("graph") | Err(_) => Mode::Graph,
                Ok(other) => {
                    eprintln!("note: DISTILL_DECODE={other} is none of ops, direct, graph; using graph");
                    Mode::Graph
                }
            };
            let _ = MODE.compare_exchange(0, code(mode), Ordering::Relaxed, Ordering::Relaxed);
            self::mode()
        }
        code => MODES[usize::from(code - 1).min(2)],
    }
}

/// Whether decoding steps are fused (any mode but [`Mode::Ops`]).
pub fn enabled() -> bool {
    mode() != Mode::Ops
}

/// Runs every later decoding step in `mode`: to compare the modes.
pub fn set_mode(mode: Mode) {
    MODE.store(code(mode), Ordering::Relaxed);
}

/// `mode` as [`MODE`] holds it: 1 + its index in [`MODES`].
fn code(mode: Mode) -> u8 {
    1 + MODES.iter().position(|m| *m == mode).unwrap_or(2) as u8
}

thread_local! {
    static STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many fused steps this thread has queued: lets a test tell them from the op-by-op path.
pub fn steps_on_this_thread() -> usize {
    STEPS.with(|n| n.get())
}

static REPLAYED: AtomicUsize = AtomicUsize::new(0);
static CAPTURED: AtomicUsize = AtomicUsize::new(0);
static ISSUED: AtomicUsize = AtomicUsize::new(0);
static ISSUE_NS: AtomicU64 = AtomicU64::new(0);

/// Fused steps issued so far in this process: [replayed from a graph, captured into one,
/// all], and the host time the device thread spent issuing them. Counted as the device
/// thread issues them: a sync or read of the results first makes them current.
pub fn issued() -> ([usize; 3], std::time::Duration) {
    let counts = [&REPLAYED, &CAPTURED, &ISSUED].map(|c| c.load(Ordering::Relaxed));
    (
        counts,
        std::time::Duration::from_nanos(ISSUE_NS.load(Ordering::Relaxed)),
    )
}

/// One layer's weights, as primitives ([`crate::DecodeLayer`]).
pub(super) struct Layer {
    pub input_norm: CudaTensor,
    pub qkv: Parts,
    pub o_proj: CudaTensor,
    pub post_norm: CudaTensor,
    pub gate_up: Parts,
    pub down_proj: CudaTensor,
}

/// A projection's parts side by side ([`crate::Projection`]): weights and biases.
pub(super) type Parts = Vec<(CudaTensor, Option<CudaTensor>)>;

/// The decoder's weights, as primitives ([`crate::DecodeWeights`]).
pub(super) struct Weights {
    pub embed: CudaTensor,
    pub layers: Vec<Layer>,
    pub norm: CudaTensor,
    pub lm_head: CudaTensor,
    pub eps: f64,
    pub heads: [usize; 2],
    pub hd: usize,
}

/// One step's inputs, as primitives ([`crate::DecodeInputs`]): lo and hi are the key ranges;
/// table [B * ld] and shift [B] the paged cache's page table ([`crate::PageTable`]).
pub(super) struct Inputs {
    pub ids: CudaTensor,
    pub cos: CudaTensor,
    pub sin: CudaTensor,
    pub keys: Option<(CudaTensor, CudaTensor)>,
    pub at: usize,
    pub table: CudaTensor,
    pub ld: usize,
    pub shift: CudaTensor,
    pub page_len: usize,
}

/// The model's widths, checked against every weight.
#[derive(Clone, Copy, Debug)]
struct Dims {
    /// Rows (the batch), hidden size, q/k/v's width, intermediate size, logits' width.
    b: usize,
    c: usize,
    qkv: usize,
    inter: usize,
    vocab: usize,
}

/// Buffers bound for the step's task, by their index in the binding list.
#[derive(Default)]
struct Bindings(Vec<Binding>);

impl Bindings {
    fn add(&mut self, t: &CudaTensor) -> usize {
        self.0.push(t.handle.clone().binding());
        self.0.len() - 1
    }
}

/// One layer's bindings and GEMM layouts.
struct BoundLayer {
    input_norm: usize,
    qkv: Vec<BoundPart>,
    bias: Bias,
    o_proj: (usize, WeightLayout),
    post_norm: usize,
    gate_up: Vec<BoundPart>,
    down_proj: (usize, WeightLayout),
    k_cache: usize,
    v_cache: usize,
}

/// One part of a projection: its weight's binding and layout, and the columns it writes.
struct BoundPart {
    weight: usize,
    layout: WeightLayout,
    column: usize,
    width: usize,
    bias: Option<usize>,
}

/// Where `rope_qkv` finds the q/k/v bias: none, one fused bias, or the parts' biases, copied
/// side by side into the step's bias buffer first.
enum Bias {
    None,
    Fused(usize),
    Parts,
}

/// What a cache keeps between fused steps (in its [`crate::StepState`]): the step's work
/// buffers, sized for its batch, and the graph that issues it. A step of another size
/// replaces it.
pub(super) struct State {
    sizes: Vec<(usize, DType)>,
    work: Vec<CudaTensor>,
    replays: Arc<Mutex<Replays>>,
    device: burn::backend::cuda::CudaDevice,
}

impl Drop for State {
    fn drop(&mut self) {
        // Graph handles are destroyed on the device thread, where the context is current.
        let graph = std::mem::take(&mut *stream::lock(&self.replays));
        let destroyed =
            stream::run_on_stream_all(&self.device, Vec::new(), nvrtc::ordering(), move |_, _| {
                drop(graph);
                Ok(())
            });
        if let Err(e) = destroyed {
            eprintln!("warning: a decoding step's CUDA graph was not destroyed: {e}");
        }
    }
}

impl State {
    /// `slot`'s state if its buffers have these sizes, else a new one with such buffers.
    fn for_sizes<'s>(
        slot: &'s mut StepState,
        sizes: Vec<(usize, DType)>,
        like: &CudaTensor,
    ) -> Result<&'s State, String> {
        let fits = |s: &StepState| {
            s.0.as_ref()
                .and_then(|s| s.downcast_ref::<State>())
                .is_some_and(|s| s.sizes == sizes)
        };
        if !fits(slot) {
            // The old buffers go before the new ones are taken.
            slot.0 = None;
            let work = sizes
                .iter()
                .map(|&(n, dtype)| flash::empty(like, vec![n], dtype))
                .collect();
            slot.0 = Some(Box::new(State {
                sizes,
                work,
                replays: Arc::default(),
                device: like.device.clone(),
            }));
        }
        slot.0
            .as_ref()
            .and_then(|s| s.downcast_ref::<State>())
            .ok_or_else(|| "a decoding step's state of another backend".into())
    }
}

/// Queues one decoding step: logits [B, V] for the token of each row, every layer's keys and
/// values of position `x.at` written into its pools `caches` [slots, KV, hd] where the page
/// table puts them. `state` keeps the step's buffers and graph for the cache's next step.
pub(super) fn step(
    w: &Weights,
    x: &Inputs,
    caches: &[(CudaTensor, CudaTensor)],
    state: &mut StepState,
) -> Result<CudaTensor, String> {
    let mode = mode();
    if mode == Mode::Ops {
        return Err("DISTILL_DECODE=ops".into());
    }
    if crate::attention_mode() != crate::AttentionMode::Flash {
        return Err("DISTILL_ATTENTION is not flash".into());
    }
    let d = dims(w, x)?;
    let [heads, kv_heads] = w.heads;
    let hd = w.hd;
    check_pages(x, d.b)?;
    let ld = x.ld;
    if caches.len() != w.layers.len() {
        return Err(format!(
            "{} cache buffers for {} layers",
            caches.len(),
            w.layers.len()
        ));
    }
    let (tab_rows, tab_bf16) = elementwise::tables(&x.cos, &x.sin, [d.b, 1, hd])?;
    let (keys, per_row) = flash::ranges(x.keys.as_ref().map(|(lo, hi)| (lo, hi)), d.b, 1)?;
    let device = x.ids.device.clone();
    for m in [module(), elementwise::module(), flash::module(hd)] {
        nvrtc::ensure_loaded(&device, m)?;
    }

    let bf = DType::BF16;
    let (b, at) = (d.b, x.at);
    let scale = flash::softmax_scale(hd);
    let forward = Forward {
        shape: Shape {
            b,
            heads,
            groups: heads / kv_heads,
            t: 1,
            s: at + 1,
            hd,
        },
        strides: attention_strides(heads, kv_heads, hd),
        has_keys: keys.is_some(),
        per_row,
        scale,
    };
    let Some(decode) = forward.decode() else {
        return Err(format!(
            "{heads} query heads a K/V head of {kv_heads}: more than paged decoding takes"
        ));
    };
    // Split partials sized for any length the page table holds, so a graph outlives the
    // splits' growth.
    let [part, ml] = decode.scratch_up_to(ld * x.page_len);
    // The step's work buffers, each reused by every layer and kept for the next step: the
    // residual stream, a norm's output, q/k/v, q rotated, attention's output, log-sum-exp and
    // split partials, gate/up, SwiGLU's output, q/k/v's bias when it comes in parts, and the
    // logits a graph writes.
    let sizes = vec![
        (b * d.c, bf),
        (b * d.c, bf),
        (b * d.qkv, bf),
        (b * heads * hd, bf),
        (b * heads * hd, bf),
        (b * heads, DType::F32),
        (part, DType::F32),
        (ml, DType::F32),
        (b * 2 * d.inter, bf),
        (b * d.inter, bf),
        (d.qkv, bf),
        (b * d.vocab, bf),
    ];
    let st = State::for_sizes(state, sizes, &x.ids)?;
    let logits = flash::empty(&x.ids, vec![b, d.vocab], bf);

    let mut bound = Bindings::default();
    let work: [&CudaTensor; 12] = std::array::from_fn(|i| &st.work[i]);
    let [
        hx,
        hn,
        hqkv,
        hq,
        hattn,
        hlse,
        hpart,
        hml,
        hgu,
        hh,
        hbias,
        hgraph_logits,
    ] = work.map(|t| bound.add(t));
    let hlogits = bound.add(&logits);
    let (hids, hembed, hcos, hsin) = (
        bound.add(&x.ids),
        bound.add(&w.embed),
        bound.add(&x.cos),
        bound.add(&x.sin),
    );
    // Without ranges the kernel gets null pointers; q's binding stands in.
    let (hlo, hhi) = match &keys {
        Some((lo, hi)) => (bound.add(lo), bound.add(hi)),
        None => (hq, hq),
    };
    let (htable, hshift) = (bound.add(&x.table), bound.add(&x.shift));
    let hnorm = bound.add(&w.norm);
    let head = (
        bound.add(&w.lm_head),
        gemm_layout(&w.lm_head, [d.c, d.vocab], "lm_head")?,
    );
    let layers = w
        .layers
        .iter()
        .zip(caches)
        .map(|(l, (k, v))| bind_layer(&mut bound, l, (k, v), d, [kv_heads, hd]))
        .collect::<Result<Vec<_>, String>>()?;
    let page_len = x.page_len;

    let embed_ld = w.embed.meta.strides()[0];
    let eps = w.eps as f32;
    let shared = tab_rows == 1;
    let index = device.index;
    let modules = [module(), elementwise::module(), flash::module(hd)];
    let replays = st.replays.clone();
    stream::run_on_stream_all(&device, bound.0, nvrtc::ordering(), move |stream, p| {
        let started = Instant::now();
        let [ours, elem, attn] = &modules;
        let functions = [ours, elem, attn].map(|m| nvrtc::functions(index, m));
        let [f_ours, f_elem, f_attn] = functions;
        let (f_ours, f_elem, f_attn) = (f_ours?, f_elem?, f_attn?);
        let run = |is: &mut Issuer<'_>, call: Call, (m, f): (&nvrtc::Module, &[usize])| {
            is.kernel(call.function(m, f)?, &call)
        };
        let (ours, elem, attn) = ((ours, &f_ours[..]), (elem, &f_elem[..]), (attn, &f_attn[..]));
        // x [m, k] @ w [k, n] into rows of `ldc` (a projection's part writes its columns of
        // a wider row), or added to them; `name` is its role, for profiles.
        let gemm =
            |is: &mut Issuer<'_>, name, ptrs: [u64; 3], layout, [m, k, n]: [usize; 3], ldc, accumulate| {
                let g = RowGemm {
                    m,
                    n,
                    k,
                    ldc,
                    w: layout,
                    dtype: DType::BF16,
                    accumulate,
                };
                is.other(name, &g.key(ptrs), |stream| {
                    cublas::row_gemm(index, stream, ptrs, &g)
                })
            };
        let project = |is: &mut Issuer<'_>, name, x: usize, parts: &[BoundPart], out: usize, total: usize| {
            parts.iter().try_for_each(|part| {
                let out = p[out] + (part.column * 2) as u64;
                gemm(
                    is,
                    name,
                    [p[x], p[part.weight], out],
                    part.layout,
                    [b, d.c, part.width],
                    total,
                    false,
                )
            })
        };
        let norm = |is: &mut Issuer<'_>, [x, w, y]: [usize; 3]| {
            run(
                is,
                elementwise::rms_norm_call([p[x], p[w], p[y]], 1, b, d.c, eps),
                elem,
            )
        };
        let graphed = mode == Mode::Graph;
        // A graph writes logits of its own, copied out after it runs.
        let logits_at = p[if graphed { hgraph_logits } else { hlogits }];
        let pages = Paging {
            table: p[htable],
            ld,
            shift: p[hshift],
            page_len,
        };
        let body = |is: &mut Issuer<'_>| -> Result<(), Issue> {
            run(
                is,
                embed_call([p[hids], p[hembed], p[hx]], b, [d.c, embed_ld]),
                ours,
            )?;
            for l in &layers {
                norm(is, [hx, l.input_norm, hn])?;
                project(is, "q/k/v", hn, &l.qkv, hqkv, d.qkv)?;
                let bias = match l.bias {
                    Bias::None => None,
                    Bias::Fused(h) => Some(p[h]),
                    Bias::Parts => {
                        for part in &l.qkv {
                            let (src, at) =
                                (p[part.bias.unwrap_or(hbias)], p[hbias] + (part.column * 2) as u64);
                            let bytes = part.width * 2;
                            is.other("q/k/v bias copy", &[at, src, bytes as u64], |stream| {
                                // SAFETY: both ranges lie in live bf16 buffers bound for this task.
                                unsafe { cudarc::driver::result::memcpy_dtod_async(at, src, bytes, stream) }
                                    .map_err(|e| format!("q/k/v bias copy: {e}"))
                            })?;
                        }
                        Some(p[hbias])
                    }
                };
                let rope = RopeQkv {
                    bf16: 1,
                    tab_bf16,
                    heads: [heads, kv_heads],
                    b,
                    t: 1,
                    hd,
                    shared,
                    has_bias: bias.is_some(),
                    cap: 0,
                    at,
                    pages: Some(pages),
                };
                let ptrs = [
                    p[hqkv],
                    bias.unwrap_or(0),
                    p[hq],
                    p[l.k_cache],
                    p[l.v_cache],
                    p[hcos],
                    p[hsin],
                ];
                run(is, rope.call(ptrs), elem)?;
                let ptrs = [
                    p[hq],
                    p[l.k_cache],
                    p[l.v_cache],
                    p[hattn],
                    p[hlse],
                    p[hlo],
                    p[hhi],
                    p[hpart],
                    p[hml],
                ];
                let calls = decode.calls(ptrs, Some(pages));
                calls.into_iter().try_for_each(|c| run(is, c, attn))?;
                let (o, ol) = l.o_proj;
                gemm(
                    is,
                    "o_proj",
                    [p[hattn], p[o], p[hx]],
                    ol,
                    [b, heads * hd, d.c],
                    d.c,
                    true,
                )?;
                norm(is, [hx, l.post_norm, hn])?;
                project(is, "gate/up", hn, &l.gate_up, hgu, 2 * d.inter)?;
                // gate and up: the two halves of each gate/up row, as the op path's column views.
                let up = p[hgu] + (d.inter * 2) as u64;
                let n = b * d.inter;
                let swiglu = elementwise::swiglu_call([p[hgu], up, p[hh]], 1, n, d.inter, [2 * d.inter; 2]);
                run(is, swiglu, elem)?;
                let (down, dl) = l.down_proj;
                gemm(
                    is,
                    "down_proj",
                    [p[hh], p[down], p[hx]],
                    dl,
                    [b, d.inter, d.c],
                    d.c,
                    true,
                )?;
            }
            norm(is, [hx, hnorm, hn])?;
            gemm(
                is,
                "lm_head",
                [p[hn], p[head.0], logits_at],
                head.1,
                [b, d.c, d.vocab],
                d.vocab,
                false,
            )
        };
        let mut replays = stream::lock(&replays);
        replays.clock.start(stream)?;
        if graphed {
            let path = replays.issue(stream, body)?;
            let bytes = b * d.vocab * 2;
            // SAFETY: two live bf16 [b, V] buffers bound for this task.
            unsafe { cudarc::driver::result::memcpy_dtod_async(p[hlogits], logits_at, bytes, stream) }
                .map_err(|e| format!("logits copy: {e}"))?;
            match path {
                Path::Replayed => REPLAYED.fetch_add(1, Ordering::Relaxed),
                Path::Captured => CAPTURED.fetch_add(1, Ordering::Relaxed),
                Path::Direct => 0,
            };
        } else {
            let mut is = match timing::profiling() {
                true => Issuer::profiled(stream)?,
                false => Issuer::direct(stream),
            };
            body(&mut is).map_err(|e| match e {
                Issue::Failed(e) => e,
                Issue::Changed => "a direct step cannot change".into(),
            })?;
            is.finish()?;
        }
        replays.clock.stop(stream)?;
        ISSUED.fetch_add(1, Ordering::Relaxed);
        ISSUE_NS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    })?;
    STEPS.with(|n| n.set(n.get() + 1));
    Ok(logits)
}

/// Strides (batch, head, row) of q, k, v and the output as the attention kernels read them:
/// q [B, 1, H, hd] read as [B, H, 1, hd], the output written as [B, 1, H, hd]; k and v
/// pools of slots [slots, KV, hd] read through the page table (no batch stride; a slot's
/// stride in the row's place).
fn attention_strides(heads: usize, kv_heads: usize, hd: usize) -> [[i64; 3]; 4] {
    let row = (heads * hd) as i64;
    let q = [row, hd as i64, row];
    let kv = [0, hd as i64, (kv_heads * hd) as i64];
    [q, kv, kv, q]
}

/// Checks the page table and the shifts: i32 [B * ld] and i32 [B], contiguous, with room for
/// position `at` in every row.
fn check_pages(x: &Inputs, b: usize) -> Result<(), String> {
    let shape = |t: &CudaTensor| t.meta.shape().as_slice().to_vec();
    let ld = x.ld;
    match (x.table.dtype, shape(&x.table).as_slice()) {
        (DType::I32, &[n]) if n == b * ld && x.table.is_contiguous() => {}
        (dtype, s) => return Err(format!("page table: {dtype:?} {s:?}, not i32 [{b} x {ld}]")),
    }
    match (x.shift.dtype, shape(&x.shift).as_slice()) {
        (DType::I32, &[rows]) if rows == b && x.shift.is_contiguous() => {}
        (dtype, s) => return Err(format!("page shifts: {dtype:?} {s:?}, not i32 [{b}]")),
    }
    if x.page_len == 0 || (x.at + x.page_len) / x.page_len > ld || ld * x.page_len > i32::MAX as usize {
        return Err(format!(
            "a page table of {ld} pages of {} for position {}",
            x.page_len, x.at
        ));
    }
    Ok(())
}

/// The batch and the model's widths, from the inputs and weights; errors for anything the
/// step does not take.
fn dims(w: &Weights, x: &Inputs) -> Result<Dims, String> {
    let [heads, kv_heads] = w.heads;
    if !matches!(w.hd, 64 | 128) || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!("{heads}/{kv_heads} heads of {}", w.hd));
    }
    let shape = |t: &CudaTensor| t.meta.shape().as_slice().to_vec();
    let b = match (x.ids.dtype, shape(&x.ids).as_slice()) {
        (DType::I32, &[b]) if b > 0 && x.ids.is_contiguous() => b,
        (dtype, s) => return Err(format!("ids: {dtype:?} {s:?}, not i32 [B]")),
    };
    let (c, vocab) = match (shape(&w.embed).as_slice(), shape(&w.lm_head).as_slice()) {
        (&[_, c], &[c2, v]) if c == c2 => (c, v),
        (e, h) => return Err(format!("embedding {e:?}, LM head {h:?}")),
    };
    // burn may pitch a table's rows (a row stride past its width); the gather takes that.
    let strides = w.embed.meta.strides();
    if w.embed.dtype != DType::BF16 || strides[1] != 1 || strides[0] < c {
        return Err(format!(
            "embedding table: {:?}, strides {strides:?}",
            w.embed.dtype
        ));
    }
    let qkv = (heads + 2 * kv_heads) * w.hd;
    let inter = w.layers.first().map_or(0, |l| l.down_proj.meta.shape()[0]);
    Ok(Dims {
        b,
        c,
        qkv,
        inter,
        vocab,
    })
}

/// `l`'s weights and caches bound, each checked against the model's widths.
fn bind_layer(
    bound: &mut Bindings,
    l: &Layer,
    (k, v): (&CudaTensor, &CudaTensor),
    d: Dims,
    [kv_heads, hd]: [usize; 2],
) -> Result<BoundLayer, String> {
    let vector = |t: &CudaTensor, n: usize, what: &str| {
        if t.dtype != DType::BF16 || t.meta.shape().as_slice() != [n] || !t.is_contiguous() {
            return Err(format!(
                "{what}: {:?} {:?}, not bf16 [{n}]",
                t.dtype,
                t.meta.shape().as_slice()
            ));
        }
        Ok(())
    };
    vector(&l.input_norm, d.c, "input norm")?;
    vector(&l.post_norm, d.c, "post-attention norm")?;
    let qkv = bind_parts(bound, &l.qkv, [d.c, d.qkv], "q/k/v")?;
    let gate_up = bind_parts(bound, &l.gate_up, [d.c, 2 * d.inter], "gate/up")?;
    let bias = match (qkv.as_slice(), qkv.iter().filter(|p| p.bias.is_some()).count()) {
        (_, 0) => Bias::None,
        ([one], 1) => Bias::Fused(one.bias.expect("counted")),
        (all, n) if n == all.len() => Bias::Parts,
        _ => return Err("q/k/v: some parts have a bias, some not".into()),
    };
    if gate_up.len() > 2 || gate_up.iter().any(|p| p.bias.is_some() || p.width % d.inter != 0) {
        return Err("gate/up: not one matrix or two of the intermediate size, without bias".into());
    }
    let o_in = l.o_proj.meta.shape()[0];
    let o_proj = gemm_layout(&l.o_proj, [o_in, d.c], "o_proj")?;
    let down_proj = gemm_layout(&l.down_proj, [d.inter, d.c], "down_proj")?;
    for (t, what) in [(k, "k pool"), (v, "v pool")] {
        let shape = t.meta.shape().as_slice();
        if t.dtype != DType::BF16 || shape.len() != 3 || shape[1..] != [kv_heads, hd] {
            return Err(format!(
                "{what}: {:?} {shape:?}, not bf16 [slots, {kv_heads}, {hd}]",
                t.dtype
            ));
        }
        // Written in place: a buffer someone else holds is the op-by-op path's to copy.
        if !t.is_contiguous() || !t.can_mut() {
            return Err(format!("{what}: not contiguous, or held elsewhere"));
        }
    }
    Ok(BoundLayer {
        input_norm: bound.add(&l.input_norm),
        qkv,
        bias,
        o_proj: (bound.add(&l.o_proj), o_proj),
        post_norm: bound.add(&l.post_norm),
        gate_up,
        down_proj: (bound.add(&l.down_proj), down_proj),
        k_cache: bound.add(k),
        v_cache: bound.add(v),
    })
}

/// A projection's parts bound, each checked: bf16 [k, width] weights whose widths add up to
/// `n`, biases bf16 [width].
fn bind_parts(
    bound: &mut Bindings,
    parts: &Parts,
    [k, n]: [usize; 2],
    what: &str,
) -> Result<Vec<BoundPart>, String> {
    let mut column = 0;
    let mut bound_parts = Vec::with_capacity(parts.len());
    for (w, bias) in parts {
        let width = w.meta.shape().as_slice().get(1).copied().unwrap_or(0);
        let layout = gemm_layout(w, [k, width], what)?;
        if let Some(bias) = bias
            && (bias.dtype != DType::BF16 || bias.meta.shape().as_slice() != [width] || !bias.is_contiguous())
        {
            return Err(format!(
                "{what}: a bias {:?} {:?}, not bf16 [{width}]",
                bias.dtype,
                bias.meta.shape().as_slice()
            ));
        }
        bound_parts.push(BoundPart {
            weight: bound.add(w),
            layout,
            column,
            width,
            bias: bias.as_ref().map(|b| bound.add(b)),
        });
        column += width;
    }
    if column != n || bound_parts.is_empty() {
        return Err(format!("{what}: parts {column} wide in all, not {n}"));
    }
    Ok(bound_parts)
}

/// `w`'s layout for cuBLAS after checking it is bf16 `[k, n]`.
fn gemm_layout(w: &CudaTensor, dims: [usize; 2], what: &str) -> Result<WeightLayout, String> {
    if w.dtype != DType::BF16 || w.meta.shape().as_slice() != dims {
        return Err(format!(
            "{what}: {:?} {:?}, not bf16 {dims:?}",
            w.dtype,
            w.meta.shape().as_slice()
        ));
    }
    cublas::weight_layout(w)
        .ok_or_else(|| format!("{what}: not a GEMM cuBLAS takes in place (or cuBLAS is off)"))
}

/// The gather of `[ids, table, out]`: `rows` rows of `c`, the table's `ld` apart.
fn embed_call([pi, pt, po]: [u64; 3], rows: usize, [c, ld]: [usize; 2]) -> Call {
    use Arg::*;
    Call {
        name: "embed_rows",
        how: Launch::grid_stride(rows * c),
        args: vec![
            Ptr(pi),
            Ptr(pt),
            Ptr(po),
            I32(rows as i32),
            I64(c as i64),
            I64(ld as i64),
        ],
    }
}
