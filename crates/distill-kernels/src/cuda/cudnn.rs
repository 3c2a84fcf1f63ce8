//! Attention forward and backward through cuDNN's fused flash-attention engines, for
//! training: bf16 Q, K, V with grouped K/V heads, causal (each query sees keys 0..=i) or no
//! mask, the same outputs as [`super::flash`] (O as [B, T, H, hd], the log-sum-exp per query;
//! dQ, and dK/dV per K/V head).
//!
//! Why: on Hopper cuDNN's attention engines run far ahead of our `mma.sync` kernels at R1's
//! lengths, where attention is most of a training step (docs/PERFORMANCE.md, attention rows).
//!
//! How: cuDNN's backend API, with no C++ in the build. An operation graph is written out op by
//! op exactly as cudnn-frontend's composite SDPA nodes lower to it (`CompositeSDPANode`,
//! `CompositeSDPABackwardNode` and the pointwise form of the diagonal-band mask in
//! NVIDIA/cudnn-frontend), which cuDNN's runtime-fusion engines recognise as one fused
//! attention. A plan is built once per shape and layout (heuristics A, then the fallback list;
//! the first engine config that finalizes wins), on the device thread after a one-off sync, so
//! that a graph cuDNN refuses falls back to our kernels instead of failing later on the stream.
//! Executions are queued on cubecl's stream like our NVRTC kernels ([`super::stream`]).
//!
//! libcudnn (9.10 or later, major 9) is loaded at run time: without it, with `DISTILL_CUDNN=off`,
//! or for inputs it does not take (packed documents, other masks, other dtypes), the caller uses
//! the flash kernels. Inference keeps the flash kernels too: a plan costs a compile per new
//! shape, which prompts of every length would pay.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering as Atomic};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cudnn::sys as dnn;
use dnn::cudnnBackendAttributeName_t as Attr;
use dnn::cudnnBackendAttributeType_t as Ty;
use dnn::cudnnBackendDescriptorType_t as Kind;
use dnn::cudnnDataType_t as Data;
use dnn::cudnnPointwiseMode_t as Pw;

use super::flash::{Shape, backward_operands, empty, operands, output};
use super::stream::{self, Ordering, lock, run_on_stream};

type CudaTensor = CubeTensor<CudaRuntime>;
type Raw = *mut c_void;

/// The few cuDNN entry points used, looked up once. Statuses are read as plain integers: a
/// newer cuDNN may return codes the bindings' enum does not list.
struct Api {
    create: unsafe extern "C" fn(*mut Raw) -> i32,
    set_stream: unsafe extern "C" fn(Raw, Raw) -> i32,
    create_desc: unsafe extern "C" fn(u32, *mut Raw) -> i32,
    destroy_desc: unsafe extern "C" fn(Raw) -> i32,
    set_attr: unsafe extern "C" fn(Raw, u32, u32, i64, *const c_void) -> i32,
    get_attr: unsafe extern "C" fn(Raw, u32, u32, i64, *mut i64, *mut c_void) -> i32,
    finalize: unsafe extern "C" fn(Raw) -> i32,
    execute: unsafe extern "C" fn(Raw, Raw, Raw) -> i32,
    error_string: unsafe extern "C" fn(i32) -> *const c_char,
    last_error: unsafe extern "C" fn(*mut c_char, usize),
}

/// The oldest cuDNN this graph is written for: from 9.6 the backward's f32 dQ accumulator is
/// cleared by cuDNN itself, and masked scores are -inf (not f32::MIN) from 9.10.
const MIN_VERSION: usize = 9_10_00;

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether cuDNN's attention may run: switched on and libcudnn loaded (loads it on first call).
pub(crate) fn usable() -> bool {
    enabled() && available()
}

fn load() -> Result<Api, String> {
    // SAFETY: only tries to dlopen the candidate names cudarc would use.
    if !unsafe { dnn::is_culib_present() } {
        return Err(
            "libcudnn could not be loaded (libcudnn.so, libcudnn.so.9, .. on the loader's path)".into(),
        );
    }
    // SAFETY: the library is present (checked above); each symbol is looked up by its C name
    // and given the C signature of cudnn_graph.h / cudnn_ops.h, enums and statuses as u32/i32.
    unsafe {
        let lib = dnn::culib();
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("libcudnn has no {}: {e}", $name))?
            };
        }
        let version: unsafe extern "C" fn() -> usize = sym!("cudnnGetVersion");
        let v = version();
        if !(MIN_VERSION..10_00_00).contains(&v) {
            return Err(format!(
                "libcudnn is version {v}; these graphs need 9.10 or later 9.x"
            ));
        }
        Ok(Api {
            create: sym!("cudnnCreate"),
            set_stream: sym!("cudnnSetStream"),
            create_desc: sym!("cudnnBackendCreateDescriptor"),
            destroy_desc: sym!("cudnnBackendDestroyDescriptor"),
            set_attr: sym!("cudnnBackendSetAttribute"),
            get_attr: sym!("cudnnBackendGetAttribute"),
            finalize: sym!("cudnnBackendFinalize"),
            execute: sym!("cudnnBackendExecute"),
            error_string: sym!("cudnnGetErrorString"),
            last_error: sym!("cudnnGetLastErrorString"),
        })
    }
}

/// `Ok` for CUDNN_STATUS_SUCCESS, else the status's name and cuDNN's last message.
fn check(api: &Api, what: &str, status: i32) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: cuDNN returns a static string for any status, and writes at most `len` bytes,
    // nul included, into the buffer.
    let (name, detail) = unsafe {
        let name = std::ffi::CStr::from_ptr((api.error_string)(status))
            .to_string_lossy()
            .into_owned();
        let mut buf = [0 as c_char; 512];
        (api.last_error)(buf.as_mut_ptr(), buf.len());
        let detail = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        (name, detail)
    };
    Err(format!("{what}: {name} ({status}) {detail}")
        .trim_end()
        .to_string())
}

/// 0: `DISTILL_CUDNN` not read yet; 1: on; 2: off.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether cuDNN is used for training attention: `DISTILL_CUDNN` = on (default) | off, read
/// at first use, or what [`set_enabled`] set.
pub fn enabled() -> bool {
    match MODE.load(Atomic::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = match std::env::var("DISTILL_CUDNN").as_deref() {
                Err(_) | Ok("") | Ok("on") | Ok("1") => true,
                Ok("off") | Ok("0") => false,
                Ok(other) => {
                    eprintln!("warning: DISTILL_CUDNN={other:?} is not one of on, off; using on");
                    true
                }
            };
            let _ = MODE.compare_exchange(0, if on { 1 } else { 2 }, Atomic::Relaxed, Atomic::Relaxed);
            enabled()
        }
    }
}

/// Switch cuDNN attention on or off for every later call (the GPU tests run both paths).
pub fn set_enabled(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Atomic::Relaxed);
}

/// Rows shorter than this many tokens stay on the flash kernels: each new shape costs a plan
/// build, which short rows of changing widths (on-policy samples) would pay at every step,
/// for attention that is a small part of their step.
static MIN_TOKENS: AtomicUsize = AtomicUsize::new(1024);

/// The shortest row cuDNN's attention is used for ([`set_min_tokens`] moves it).
pub fn min_tokens() -> usize {
    MIN_TOKENS.load(Atomic::Relaxed)
}

/// Use cuDNN's attention from rows of `n` tokens on (the GPU tests run it on short rows).
pub fn set_min_tokens(n: usize) {
    MIN_TOKENS.store(n, Atomic::Relaxed);
}

/// One line on what training attention on CUDA uses: for bench rows, logs and the GPU tests.
pub fn describe() -> String {
    if !enabled() {
        return "flash kernels (DISTILL_CUDNN=off)".into();
    }
    match API.get() {
        None => "libcudnn not tried yet".into(),
        Some(Ok(_)) => format!(
            "cuDNN for rows of {} tokens or more; {} attention plans built",
            min_tokens(),
            lock(plans()).len()
        ),
        Some(Err(why)) => format!("flash kernels ({why})"),
    }
}

/// Whether libcudnn loads and is recent enough (loads it on first call). Cheap enough for
/// every attention call: no error text is copied.
pub fn available() -> bool {
    API.get_or_init(load).is_ok()
}

thread_local! {
    static EXECUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many attention forwards and backwards this thread has handed to cuDNN: lets a test tell
/// cuDNN's result from the flash kernels', which are just as right.
pub fn executed_on_this_thread() -> usize {
    EXECUTED.with(|n| n.get())
}

/// A backend descriptor, destroyed with it. Used only on the device's runner thread.
struct Desc(Raw);

// SAFETY: descriptors are created, used and destroyed on the device's runner thread only (the
// plan cache that holds them between calls is behind a lock), and not changed once finalized.
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Drop for Desc {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: a descriptor cuDNN created and nobody else destroys.
            unsafe { (api.destroy_desc)(self.0) };
        }
    }
}

impl Desc {
    fn new(kind: Kind) -> Result<Self, String> {
        let api = api()?;
        let mut raw: Raw = std::ptr::null_mut();
        // SAFETY: cuDNN writes a new descriptor into `raw`.
        check(api, "cudnnBackendCreateDescriptor", unsafe {
            (api.create_desc)(kind as u32, &mut raw)
        })?;
        Ok(Desc(raw))
    }

    /// Sets attribute `name` to `values`, each of cuDNN type `ty` (the caller matches `T` to it).
    fn set<T>(&self, name: Attr, ty: Ty, values: &[T]) -> Result<(), String> {
        let api = api()?;
        // SAFETY: `values` is a live slice of `len` elements of the type `ty` names.
        let status = unsafe {
            (api.set_attr)(
                self.0,
                name as u32,
                ty as u32,
                values.len() as i64,
                values.as_ptr().cast(),
            )
        };
        // The attribute's name only on failure: executions set three attributes a call.
        if status == 0 {
            return Ok(());
        }
        check(api, &format!("set {name:?}"), status)
    }

    fn set_descs(&self, name: Attr, descs: &[&Desc]) -> Result<(), String> {
        let raws: Vec<Raw> = descs.iter().map(|d| d.0).collect();
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raws)
    }

    fn finalize(self) -> Result<Self, String> {
        let api = api()?;
        // SAFETY: a live descriptor.
        check(api, "cudnnBackendFinalize", unsafe { (api.finalize)(self.0) })?;
        Ok(self)
    }
}

/// Tensor unique ids of the graphs' non-virtual tensors (the variant pack's keys).
mod uid {
    pub const Q: i64 = 1;
    pub const K: i64 = 2;
    pub const V: i64 = 3;
    pub const O: i64 = 4;
    pub const STATS: i64 = 5;
    pub const D_O: i64 = 6;
    pub const D_Q: i64 = 7;
    pub const D_K: i64 = 8;
    pub const D_V: i64 = 9;
    pub const SCALE: i64 = 10;
    pub const NEG_INF: i64 = 11;
    pub const ONE: i64 = 12;
    pub const SOFTMAX_SUM: i64 = 13;
    pub const D_Q_ACCUM: i64 = 14;
    /// Virtual tensors count up from here.
    pub const FIRST_VIRTUAL: i64 = 100;
}

/// [dims, strides] of a 4-d tensor, in elements.
type Layout = ([i64; 4], [i64; 4]);

/// A tensor of the graph being built: its descriptor's index and its layout.
#[derive(Clone, Copy)]
struct T {
    index: usize,
    layout: Layout,
}

/// An operation graph under construction: every descriptor it creates, kept alive with the
/// plan built from it.
struct Builder {
    tensors: Vec<Desc>,
    ops: Vec<Desc>,
    /// Pointwise, reduction and matmul descriptors the operations refer to.
    parts: Vec<Desc>,
    next_virtual: i64,
}

impl Builder {
    fn new() -> Self {
        Builder {
            tensors: Vec::new(),
            ops: Vec::new(),
            parts: Vec::new(),
            next_virtual: uid::FIRST_VIRTUAL,
        }
    }

    fn tensor(
        &mut self,
        uid: i64,
        data: Data,
        layout: Layout,
        virtual_: bool,
        by_value: bool,
    ) -> Result<T, String> {
        let d = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        d.set(
            Attr::CUDNN_ATTR_TENSOR_DATA_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[data],
        )?;
        d.set(
            Attr::CUDNN_ATTR_TENSOR_DIMENSIONS,
            Ty::CUDNN_TYPE_INT64,
            &layout.0,
        )?;
        d.set(Attr::CUDNN_ATTR_TENSOR_STRIDES, Ty::CUDNN_TYPE_INT64, &layout.1)?;
        d.set(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, Ty::CUDNN_TYPE_INT64, &[uid])?;
        d.set(
            Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
            Ty::CUDNN_TYPE_INT64,
            &[16i64],
        )?;
        d.set(
            Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
            Ty::CUDNN_TYPE_BOOLEAN,
            &[virtual_],
        )?;
        if by_value {
            d.set(
                Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                Ty::CUDNN_TYPE_BOOLEAN,
                &[true],
            )?;
        }
        self.tensors.push(d.finalize()?);
        Ok(T {
            index: self.tensors.len() - 1,
            layout,
        })
    }

    /// A tensor the variant pack supplies.
    fn io(&mut self, uid: i64, data: Data, layout: Layout) -> Result<T, String> {
        self.tensor(uid, data, layout, false, false)
    }

    /// An f32 scalar passed by value from host memory at each execution.
    fn scalar(&mut self, uid: i64) -> Result<T, String> {
        self.tensor(uid, Data::CUDNN_DATA_FLOAT, ([1; 4], [1; 4]), false, true)
    }

    /// An intermediate no memory holds.
    fn virt(&mut self, data: Data, layout: Layout) -> Result<T, String> {
        let uid = self.next_virtual;
        self.next_virtual += 1;
        self.tensor(uid, data, layout, true, false)
    }

    fn desc(&self, t: T) -> &Desc {
        &self.tensors[t.index]
    }

    /// y = mode(x[, b[, t]]) computed in `precision`; `axis` for GEN_INDEX.
    fn pointwise_in(
        &mut self,
        mode: Pw,
        precision: Data,
        axis: Option<i64>,
        inputs: &[T],
        y: T,
    ) -> Result<(), String> {
        let pw = Desc::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set(
            Attr::CUDNN_ATTR_POINTWISE_MODE,
            Ty::CUDNN_TYPE_POINTWISE_MODE,
            &[mode],
        )?;
        pw.set(
            Attr::CUDNN_ATTR_POINTWISE_MATH_PREC,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[precision],
        )?;
        if let Some(axis) = axis {
            pw.set(Attr::CUDNN_ATTR_POINTWISE_AXIS, Ty::CUDNN_TYPE_INT64, &[axis])?;
        }
        let pw = pw.finalize()?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
        let slots = [
            Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC,
            Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC,
            Attr::CUDNN_ATTR_OPERATION_POINTWISE_TDESC,
        ];
        for (&slot, &x) in slots.iter().zip(inputs) {
            op.set_descs(slot, &[self.desc(x)])?;
        }
        op.set_descs(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[self.desc(y)])?;
        self.ops.push(op.finalize()?);
        self.parts.push(pw);
        Ok(())
    }

    /// y = mode(inputs) in f32, into a new virtual tensor of `data` laid out as `layout`.
    fn pointwise(&mut self, mode: Pw, inputs: &[T], data: Data, layout: Layout) -> Result<T, String> {
        let y = self.virt(data, layout)?;
        self.pointwise_in(mode, Data::CUDNN_DATA_FLOAT, None, inputs, y)?;
        Ok(y)
    }

    /// y = reduce(x) over the dims where y has size 1.
    fn reduce_in(&mut self, op: dnn::cudnnReduceTensorOp_t, x: T, y: T) -> Result<(), String> {
        let r = Desc::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        r.set(
            Attr::CUDNN_ATTR_REDUCTION_OPERATOR,
            Ty::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
            &[op],
        )?;
        r.set(
            Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[Data::CUDNN_DATA_FLOAT],
        )?;
        let r = r.finalize()?;
        let o = Desc::new(Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &[&r])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[self.desc(x)])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[self.desc(y)])?;
        self.ops.push(o.finalize()?);
        self.parts.push(r);
        Ok(())
    }

    /// c = a @ b over the last two dims, batched over the first two (b's heads may be fewer:
    /// grouped K/V heads).
    fn matmul_in(&mut self, a: T, b: T, c: T) -> Result<(), String> {
        let m = Desc::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        m.set(
            Attr::CUDNN_ATTR_MATMUL_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[Data::CUDNN_DATA_FLOAT],
        )?;
        let m = m.finalize()?;
        let o = Desc::new(Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[self.desc(a)])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[self.desc(b)])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[self.desc(c)])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC, &[&m])?;
        self.ops.push(o.finalize()?);
        self.parts.push(m);
        Ok(())
    }

    /// The same memory seen with other dims and strides (a transpose of the last two).
    fn reshape(&mut self, x: T, data: Data, layout: Layout) -> Result<T, String> {
        let y = self.virt(data, layout)?;
        let o = Desc::new(Kind::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR)?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, &[self.desc(x)])?;
        o.set_descs(Attr::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, &[self.desc(y)])?;
        self.ops.push(o.finalize()?);
        Ok(y)
    }

    /// Scores with keys after the query's position set to -inf: the diagonal-band mask's
    /// pointwise form (row index >= column index keeps a score).
    fn causal_mask(&mut self, x: T, neg_inf: T) -> Result<T, String> {
        let l = x.layout;
        let row = self.virt(Data::CUDNN_DATA_INT32, l)?;
        self.pointwise_in(
            Pw::CUDNN_POINTWISE_GEN_INDEX,
            Data::CUDNN_DATA_FLOAT,
            Some(2),
            &[x],
            row,
        )?;
        let col = self.virt(Data::CUDNN_DATA_INT32, l)?;
        self.pointwise_in(
            Pw::CUDNN_POINTWISE_GEN_INDEX,
            Data::CUDNN_DATA_FLOAT,
            Some(3),
            &[x],
            col,
        )?;
        let keep = self.virt(Data::CUDNN_DATA_BOOLEAN, l)?;
        self.pointwise_in(
            Pw::CUDNN_POINTWISE_CMP_GE,
            Data::CUDNN_DATA_BOOLEAN,
            None,
            &[row, col],
            keep,
        )?;
        self.pointwise(
            Pw::CUDNN_POINTWISE_BINARY_SELECT,
            &[x, neg_inf, keep],
            Data::CUDNN_DATA_FLOAT,
            l,
        )
    }
}

const F32: Data = Data::CUDNN_DATA_FLOAT;
const BF16: Data = Data::CUDNN_DATA_BFLOAT16;

/// One attention call's shapes and operand strides: what a plan is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    device: usize,
    backward: bool,
    causal: bool,
    /// B, H, KV, T (= S), hd.
    dims: [i64; 5],
    /// Batch, head and row strides of q, k, v, o (and dO in the backward).
    strides: [[i64; 3]; 5],
}

impl Key {
    fn layout(&self, which: usize, heads: i64) -> Layout {
        let [b, _, _, t, hd] = self.dims;
        let [sb, sh, sr] = self.strides[which];
        ([b, heads, t, hd], [sb, sh, sr, 1])
    }

    /// [B, H, T, T] f32 scores, and [B, H, T, 1] per query.
    fn scores(&self) -> (Layout, Layout) {
        let [b, h, _, t, _] = self.dims;
        (
            ([b, h, t, t], [h * t * t, t * t, t, 1]),
            ([b, h, t, 1], [h * t, t, 1, 1]),
        )
    }
}

/// Swaps the last two dims: K as Kᵀ for Q Kᵀ.
fn transposed((d, s): Layout) -> Layout {
    ([d[0], d[1], d[3], d[2]], [s[0], s[1], s[3], s[2]])
}

const Q_AT: usize = 0;
const K_AT: usize = 1;
const V_AT: usize = 2;
const O_AT: usize = 3;
const DO_AT: usize = 4;

/// The forward: S = scale Q Kᵀ (masked), P = softmax(S) with stats = max + log(sum exp), O = P V.
fn forward_graph(g: &mut Builder, key: &Key) -> Result<(), String> {
    let [_, h, kv, _, _] = key.dims;
    let (scores, rows) = key.scores();
    let q = g.io(uid::Q, BF16, key.layout(Q_AT, h))?;
    let kt = g.io(uid::K, BF16, transposed(key.layout(K_AT, kv)))?;
    let v = g.io(uid::V, BF16, key.layout(V_AT, kv))?;
    let o = g.io(uid::O, BF16, key.layout(O_AT, h))?;
    let stats = g.io(uid::STATS, F32, rows)?;
    let scale = g.scalar(uid::SCALE)?;

    let s = g.virt(F32, scores)?;
    g.matmul_in(q, kt, s)?;
    let mut s = g.pointwise(Pw::CUDNN_POINTWISE_MUL, &[s, scale], F32, scores)?;
    if key.causal {
        let neg_inf = g.scalar(uid::NEG_INF)?;
        s = g.causal_mask(s, neg_inf)?;
    }
    let max = g.virt(F32, rows)?;
    g.reduce_in(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_MAX, s, max)?;
    let shifted = g.pointwise(Pw::CUDNN_POINTWISE_SUB, &[s, max], F32, scores)?;
    let e = g.pointwise(Pw::CUDNN_POINTWISE_EXP, &[shifted], F32, scores)?;
    let sum = g.virt(F32, rows)?;
    g.reduce_in(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, e, sum)?;
    let log = g.pointwise(Pw::CUDNN_POINTWISE_LOG, &[sum], F32, rows)?;
    g.pointwise_in(Pw::CUDNN_POINTWISE_ADD, F32, None, &[max, log], stats)?;
    // P in bf16: the second matmul's A operand takes the inputs' type.
    let p = g.pointwise(Pw::CUDNN_POINTWISE_DIV, &[e, sum], BF16, scores)?;
    g.matmul_in(p, v, o)
}

/// The backward: softmax_sum = rowsum(dO ∘ O); P = exp(scale Q Kᵀ - stats) (masked);
/// dV = Pᵀ dO; dS = P ∘ (dO Vᵀ - softmax_sum) scale; dK = dSᵀ Q; dQ = dS K. Grouped heads'
/// dK and dV are computed per query head and summed over each group.
fn backward_graph(g: &mut Builder, key: &Key) -> Result<(), String> {
    let [b, h, kv, t, hd] = key.dims;
    let (scores, rows) = key.scores();
    let q = g.io(uid::Q, BF16, key.layout(Q_AT, h))?;
    let kt = g.io(uid::K, BF16, transposed(key.layout(K_AT, kv)))?;
    let vt = g.io(uid::V, BF16, transposed(key.layout(V_AT, kv)))?;
    let o = g.io(uid::O, BF16, key.layout(O_AT, h))?;
    let d_o = g.io(uid::D_O, BF16, key.layout(DO_AT, h))?;
    let stats = g.io(uid::STATS, F32, rows)?;
    let contiguous = |heads: i64| ([b, heads, t, hd], [heads * t * hd, t * hd, hd, 1]);
    // Outputs: dQ as [B, T, H, hd] memory, dK and dV contiguous per K/V head.
    let dq = g.io(uid::D_Q, BF16, ([b, h, t, hd], [t * h * hd, hd, h * hd, 1]))?;
    let dk = g.io(uid::D_K, BF16, contiguous(kv))?;
    let dv = g.io(uid::D_V, BF16, contiguous(kv))?;
    let scale = g.scalar(uid::SCALE)?;
    let one = g.scalar(uid::ONE)?;

    // softmax_sum, kept in memory of ours: the engine reads it per tile.
    let prod = g.pointwise(
        Pw::CUDNN_POINTWISE_MUL,
        &[d_o, o],
        F32,
        ([b, h, t, hd], [h * t * hd, t * hd, h * hd, 1]),
    )?;
    let row_sum = g.virt(F32, rows)?;
    g.reduce_in(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, prod, row_sum)?;
    let softmax_sum = g.io(uid::SOFTMAX_SUM, F32, rows)?;
    g.pointwise_in(Pw::CUDNN_POINTWISE_MUL, F32, None, &[row_sum, one], softmax_sum)?;

    let s = g.virt(F32, scores)?;
    g.matmul_in(q, kt, s)?;
    let s = g.pointwise(Pw::CUDNN_POINTWISE_MUL, &[s, scale], F32, scores)?;
    let mut s = g.pointwise(Pw::CUDNN_POINTWISE_SUB, &[s, stats], F32, scores)?;
    if key.causal {
        let neg_inf = g.scalar(uid::NEG_INF)?;
        s = g.causal_mask(s, neg_inf)?;
    }
    let p = g.pointwise(Pw::CUDNN_POINTWISE_EXP, &[s], F32, scores)?;

    // [B, H, S, T] views of the [B, H, T, S] scores.
    let by_key = ([b, h, t, t], [h * t * t, t * t, 1, t]);
    let pt = g.reshape(p, BF16, by_key)?;
    sum_groups(g, pt, d_o, dv, h != kv)?;

    let dp = g.virt(F32, scores)?;
    g.matmul_in(d_o, vt, dp)?;
    let dp = g.pointwise(Pw::CUDNN_POINTWISE_SUB, &[dp, softmax_sum], F32, scores)?;
    let ds = g.pointwise(Pw::CUDNN_POINTWISE_MUL, &[dp, p], F32, scores)?;
    let ds = g.pointwise(Pw::CUDNN_POINTWISE_MUL, &[ds, scale], F32, scores)?;
    let dst = g.reshape(ds, BF16, by_key)?;
    sum_groups(g, dst, q, dk, h != kv)?;

    let k = g.reshape(kt, BF16, key.layout(K_AT, kv))?;
    let dq_accum = g.io(uid::D_Q_ACCUM, F32, contiguous(h))?;
    g.matmul_in(ds, k, dq_accum)?;
    g.pointwise_in(Pw::CUDNN_POINTWISE_IDENTITY, F32, None, &[dq_accum], dq)
}

/// out = a @ b, per query head, then summed over each group of query heads sharing a K/V head
/// when `grouped`.
fn sum_groups(g: &mut Builder, a: T, b: T, out: T, grouped: bool) -> Result<(), String> {
    if !grouped {
        return g.matmul_in(a, b, out);
    }
    let [n, h, rows, _] = a.layout.0;
    let cols = b.layout.0[3];
    let per_head = g.virt(
        BF16,
        ([n, h, rows, cols], [h * rows * cols, rows * cols, cols, 1]),
    )?;
    g.matmul_in(a, b, per_head)?;
    g.reduce_in(dnn::cudnnReduceTensorOp_t::CUDNN_REDUCE_TENSOR_ADD, per_head, out)
}

/// A finalized execution plan and everything it was built from.
struct Plan {
    plan: Desc,
    workspace: usize,
    /// The by-value scalars the graph reads.
    scalars: Vec<i64>,
    _graph: Vec<Desc>,
    _built_from: Builder,
}

/// Plans kept at most; the one used least recently goes first. Training uses a few shapes;
/// on-policy rows vary in width, and each plan holds compiled kernels.
const PLANS_KEPT: usize = 32;

/// Each key's plan, or why cuDNN refused it, with when it was last asked for.
#[derive(Default)]
struct Plans {
    by_key: HashMap<Key, (u64, Result<Arc<Plan>, String>)>,
    clock: u64,
}

impl Plans {
    fn get(&mut self, key: &Key) -> Option<Result<Arc<Plan>, String>> {
        self.clock += 1;
        let now = self.clock;
        self.by_key.get_mut(key).map(|(used, plan)| {
            *used = now;
            plan.clone()
        })
    }

    fn insert(&mut self, key: Key, plan: Result<Arc<Plan>, String>) {
        if self.by_key.len() >= PLANS_KEPT && !self.by_key.contains_key(&key) {
            let oldest = self
                .by_key
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.by_key.remove(&oldest);
            }
        }
        self.clock += 1;
        self.by_key.insert(key, (self.clock, plan));
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

fn plans() -> &'static Mutex<Plans> {
    static PLANS: OnceLock<Mutex<Plans>> = OnceLock::new();
    PLANS.get_or_init(Default::default)
}

/// The cuDNN handle of `device`, created on first use (on the device thread).
fn handle(device: usize) -> Result<Raw, String> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    let mut handles = lock(HANDLES.get_or_init(Default::default));
    if let Some(&h) = handles.get(&device) {
        return Ok(h as Raw);
    }
    let api = api()?;
    let mut h: Raw = std::ptr::null_mut();
    // SAFETY: the device's context is current on its runner thread.
    check(api, "cudnnCreate", unsafe { (api.create)(&mut h) })?;
    handles.insert(device, h as usize);
    Ok(h)
}

/// The graph for `key`, its heuristics' engine configs tried in order (mode A, then the
/// fallback list) until one finalizes into a plan.
fn build(key: &Key) -> Result<Plan, String> {
    let handle = handle(key.device)?;
    let mut g = Builder::new();
    if key.backward {
        backward_graph(&mut g, key)?;
    } else {
        forward_graph(&mut g, key)?;
    }
    let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph.set(
        Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
        Ty::CUDNN_TYPE_HANDLE,
        &[handle],
    )?;
    let ops: Vec<&Desc> = g.ops.iter().collect();
    graph.set_descs(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, &ops)?;
    let graph = graph.finalize()?;
    let mut refusals = Vec::new();
    for mode in [
        dnn::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
        dnn::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
    ] {
        let (heur, configs) = match engine_configs(&graph, mode) {
            Ok(found) => found,
            Err(e) => {
                refusals.push(format!("heuristics {mode:?}: {e}"));
                continue;
            }
        };
        for config in configs {
            match execution_plan(handle, &config) {
                Ok((plan, workspace)) => {
                    let mut scalars = vec![uid::SCALE];
                    scalars.extend(key.causal.then_some(uid::NEG_INF));
                    scalars.extend(key.backward.then_some(uid::ONE));
                    return Ok(Plan {
                        plan,
                        workspace,
                        scalars,
                        _graph: vec![config, heur, graph],
                        _built_from: g,
                    });
                }
                Err(e) => refusals.push(e),
            }
        }
    }
    Err(format!(
        "no cuDNN engine takes this attention graph ({})",
        refusals.last().map_or("no engine configs", String::as_str)
    ))
}

/// The engine configs cuDNN's heuristics in `mode` offer for `graph`, best first, with the
/// heuristics descriptor they came from.
fn engine_configs(graph: &Desc, mode: dnn::cudnnBackendHeurMode_t) -> Result<(Desc, Vec<Desc>), String> {
    let api = api()?;
    let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_descs(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    heur.set(
        Attr::CUDNN_ATTR_ENGINEHEUR_MODE,
        Ty::CUDNN_TYPE_HEUR_MODE,
        &[mode],
    )?;
    let heur = heur.finalize()?;
    let results = Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS as u32;
    let descriptors = Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR as u32;
    let mut count = 0i64;
    // SAFETY: a count query writes only `count`.
    let status = unsafe { (api.get_attr)(heur.0, results, descriptors, 0, &mut count, std::ptr::null_mut()) };
    check(api, "engine heuristics count", status)?;
    let mut configs: Vec<Desc> = (0..count)
        .map(|_| Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<_, _>>()?;
    let mut raws: Vec<Raw> = configs.iter().map(|c| c.0).collect();
    let mut got = 0i64;
    // SAFETY: cuDNN fills at most `count` of the descriptors we created.
    let status = unsafe {
        (api.get_attr)(
            heur.0,
            results,
            descriptors,
            count,
            &mut got,
            raws.as_mut_ptr().cast(),
        )
    };
    check(api, "engine heuristics results", status)?;
    configs.truncate(got.max(0) as usize);
    Ok((heur, configs))
}

/// `config` finalized into an execution plan, and the workspace bytes it needs; Err when this
/// engine does not take the graph here.
fn execution_plan(handle: Raw, config: &Desc) -> Result<(Desc, usize), String> {
    let api = api()?;
    let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        Ty::CUDNN_TYPE_HANDLE,
        &[handle],
    )?;
    plan.set_descs(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[config])?;
    let plan = plan.finalize()?;
    let (mut workspace, mut n) = (0i64, 0i64);
    // SAFETY: one i64 written.
    let status = unsafe {
        (api.get_attr)(
            plan.0,
            Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE as u32,
            Ty::CUDNN_TYPE_INT64 as u32,
            1,
            &mut n,
            (&mut workspace as *mut i64).cast(),
        )
    };
    check(api, "plan workspace size", status)?;
    Ok((plan, workspace.max(0) as usize))
}

/// The plan for `key`, built on first need on the device thread after a sync of cubecl's stream
/// (`any` is a buffer of the device, to make its context current there). A refusal is
/// remembered, so a shape cuDNN does not take costs one try.
fn plan(key: Key, device: &burn::backend::cuda::CudaDevice, any: &CudaTensor) -> Result<Arc<Plan>, String> {
    if let Some(found) = lock(plans()).get(&key) {
        return found;
    }
    let binding = any.handle.clone().binding();
    // Built, and an evicted plan dropped, on the device thread, where its context is current.
    run_on_stream(device, [binding], Ordering::Sync, move |_, _| {
        let plan = build(&key).map(Arc::new);
        lock(plans()).insert(key, plan);
        Ok(())
    })?;
    lock(plans())
        .get(&key)
        .unwrap_or_else(|| Err("the plan was not built".into()))
}

/// Where [`execute`] puts the workspace: the last binding, under no tensor id.
const WORKSPACE: i64 = 0;

/// Runs `plan` on cubecl's stream with the buffers of `bindings` under `uids` (in order; the
/// last is the workspace) and the by-value scalars the graph reads.
fn execute<const N: usize>(
    plan: Arc<Plan>,
    device: &burn::backend::cuda::CudaDevice,
    bindings: [burn_cubecl::cubecl::server::Binding; N],
    uids: [i64; N],
    scale: f32,
) -> Result<(), String> {
    let index = device.index;
    let mode = match stream::ordering() {
        Ordering::Sync => Ordering::Sync,
        _ => Ordering::Stream,
    };
    run_on_stream(device, bindings, mode, move |stream, ptrs| {
        let api = api()?;
        let handle = handle(index)?;
        // SAFETY: a live handle and stream of the current context.
        check(api, "cudnnSetStream", unsafe {
            (api.set_stream)(handle, stream as Raw)
        })?;
        let scalars: [(i64, f32); 3] = [
            (uid::SCALE, scale),
            (uid::NEG_INF, f32::NEG_INFINITY),
            (uid::ONE, 1.0),
        ];
        let mut ids = Vec::with_capacity(N + 2);
        let mut data: Vec<Raw> = Vec::with_capacity(N + 2);
        let mut workspace: Raw = std::ptr::null_mut();
        for (&uid, &ptr) in uids.iter().zip(&ptrs) {
            if uid == WORKSPACE {
                workspace = ptr as Raw;
            } else {
                ids.push(uid);
                data.push(ptr as Raw);
            }
        }
        for (uid, value) in scalars.iter().filter(|(uid, _)| plan.scalars.contains(uid)) {
            ids.push(*uid);
            data.push((value as *const f32).cast_mut().cast());
        }
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &ids,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &data,
        )?;
        pack.set(
            Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[workspace],
        )?;
        let pack = pack.finalize()?;
        // SAFETY: the pointers are live buffers of the sizes the plan's tensors describe (held
        // until after this call), the scalars live on this stack frame through the call.
        check(api, "cudnnBackendExecute", unsafe {
            (api.execute)(handle, plan.plan.0, pack.0)
        })
    })?;
    EXECUTED.with(|n| n.set(n.get() + 1));
    Ok(())
}

/// A workspace of at least `bytes` (never empty: it is always bound).
fn workspace(like: &CudaTensor, bytes: usize) -> CudaTensor {
    empty(like, vec![bytes.div_ceil(4).max(4)], DType::F32)
}

fn binding(t: &CudaTensor) -> burn_cubecl::cubecl::server::Binding {
    t.handle.clone().binding()
}

/// The forward of [`super::flash::forward`] by cuDNN, for a causal mask (`causal`: each query i
/// sees keys 0..=i) or none, as many keys as queries. Returns O as [B, T, H, hd] (contiguous)
/// and the log-sum-exp [B, H, T, 1] f32, as the flash kernels do.
pub fn forward(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    causal: bool,
    scale: f32,
) -> Result<(CudaTensor, CudaTensor), String> {
    if !usable() {
        return Err(describe());
    }
    let (sh, [q, k, v]) = operands(q, k, v)?;
    let o = output(&q.tensor, q.dims());
    let key = sh.key(
        &q.tensor,
        false,
        causal,
        [q.strides, k.strides, v.strides, o.strides, [0; 3]],
    )?;
    let device = q.tensor.device.clone();
    let plan = plan(key, &device, &q.tensor)?;
    let lse = empty(&q.tensor, vec![sh.b, sh.heads, sh.t, 1], DType::F32);
    let ws = workspace(&q.tensor, plan.workspace);
    execute(
        plan,
        &device,
        [
            q.binding(),
            k.binding(),
            v.binding(),
            o.binding(),
            binding(&lse),
            binding(&ws),
        ],
        [uid::Q, uid::K, uid::V, uid::O, uid::STATS, WORKSPACE],
        scale,
    )?;
    Ok((o.tensor, lse))
}

/// The backward of [`forward`] (or of the flash kernels' forward: the log-sum-exp is the
/// same), as [`super::flash::backward`]: dq as [B, T, H, hd], dk and dv as [B, KV, S, hd],
/// bf16 and contiguous.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    causal: bool,
    out: &CudaTensor,
    lse: &CudaTensor,
    d_out: &CudaTensor,
    scale: f32,
) -> Result<(CudaTensor, CudaTensor, CudaTensor), String> {
    if !usable() {
        return Err(describe());
    }
    let (sh, [q, k, v]) = operands(q, k, v)?;
    let (out, d_out, lse) = backward_operands(&sh, &q, out, lse, d_out)?;
    let strides = [q.strides, k.strides, v.strides, out.strides, d_out.strides];
    let key = sh.key(&q.tensor, true, causal, strides)?;
    let device = q.tensor.device.clone();
    let plan = plan(key, &device, &q.tensor)?;
    let kv = sh.heads / sh.groups;
    let dq = output(&q.tensor, q.dims());
    let dk = empty(&q.tensor, vec![sh.b, kv, sh.s, sh.hd], DType::BF16);
    let dv = empty(&q.tensor, vec![sh.b, kv, sh.s, sh.hd], DType::BF16);
    let softmax_sum = empty(&q.tensor, vec![sh.b, sh.heads, sh.t, 1], DType::F32);
    let dq_accum = empty(&q.tensor, vec![sh.b, sh.heads, sh.t, sh.hd], DType::F32);
    let ws = workspace(&q.tensor, plan.workspace);
    execute(
        plan,
        &device,
        [
            q.binding(),
            k.binding(),
            v.binding(),
            out.binding(),
            d_out.binding(),
            binding(&lse),
            dq.binding(),
            binding(&dk),
            binding(&dv),
            binding(&softmax_sum),
            binding(&dq_accum),
            binding(&ws),
        ],
        [
            uid::Q,
            uid::K,
            uid::V,
            uid::O,
            uid::D_O,
            uid::STATS,
            uid::D_Q,
            uid::D_K,
            uid::D_V,
            uid::SOFTMAX_SUM,
            uid::D_Q_ACCUM,
            WORKSPACE,
        ],
        scale,
    )?;
    Ok((dq.tensor, dk, dv))
}

impl Shape {
    /// The plan key of this call, or why cuDNN does not take it.
    fn key(
        &self,
        like: &CudaTensor,
        backward: bool,
        causal: bool,
        strides: [[i64; 3]; 5],
    ) -> Result<Key, String> {
        if self.t != self.s {
            return Err(format!(
                "{} queries and {} keys: cuDNN is used for self-attention",
                self.t, self.s
            ));
        }
        let kv = self.heads / self.groups;
        Ok(Key {
            device: like.device.index,
            backward,
            causal,
            dims: [self.b, self.heads, kv, self.t, self.hd].map(|d| d as i64),
            strides,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: i64) -> Key {
        Key {
            device: 0,
            backward: false,
            causal: true,
            dims: [1, 2, 1, t, 64],
            strides: [[0; 3]; 5],
        }
    }

    /// The cache keeps at most PLANS_KEPT shapes and drops the one asked for least recently,
    /// so a run whose rows keep changing width neither grows it without bound nor loses the
    /// plans it keeps using.
    #[test]
    fn the_plan_cache_drops_the_least_recently_used_shape() {
        let mut plans = Plans::default();
        for t in 0..PLANS_KEPT as i64 {
            plans.insert(key(t), Err(format!("shape {t}")));
        }
        assert!(plans.get(&key(0)).is_some(), "shape 0, asked for again");
        plans.insert(key(1000), Err("new".into()));
        assert_eq!(plans.len(), PLANS_KEPT);
        assert!(plans.get(&key(0)).is_some(), "recently used: kept");
        assert!(plans.get(&key(1)).is_none(), "least recently used: dropped");
        assert_eq!(
            plans.get(&key(1000)).and_then(Result::err).as_deref(),
            Some("new")
        );
        plans.insert(key(1000), Err("again".into()));
        assert_eq!(plans.len(), PLANS_KEPT, "a key already held replaces itself");
    }
}
