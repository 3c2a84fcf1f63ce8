//! cuBLAS GEMMs on burn's CUDA tensors: `cublasGemmEx` ([`gemm`]) and
//! `cublasGemmStridedBatchedEx` ([`bmm`], attention's [B, H] matrix products), bf16 (or f16)
//! in, f32 compute, out in the input dtype (or f32 from [`bmm`] on request).
//!
//! Why: on one H100, burn-cuda 0.21's own bf16 matmul ran at ~218 TFLOP/s on every training
//! shape tried; cuBLAS on the same buffers at ~820 (docs: GUIDE "Platform facts").
//!
//! How the buffers are reached: a burn CUDA tensor is a `CubeTensor { client, handle, meta,
//! device, dtype, .. }`. cubecl runs every device operation on a per-device runner thread that
//! owns the `CudaServer`; we send our GEMM to that thread too
//! (`DeviceHandle::submit_blocking` the first time from a thread, then `submit`, which queues it
//! without waiting, as kernel launches are queued), so it is issued after every kernel the caller
//! launched before it and before every kernel launched after it. There `server.get_resource(binding)`
//! gives each buffer's device pointer (offset included) and makes the caller's stream wait for
//! buffers written on other streams, as a kernel launch does.
//!
//! cuBLAS handles are created on first use on the device thread and kept: one per device and
//! CUDA stream (a handle's workspace must not serve two streams at once), so one per device
//! when a single thread drives the GPU, as training does. libcublas is loaded at run time
//! (cudarc dynamic loading): without it the first GEMM prints one warning and every GEMM uses
//! burn's matmul; so does any dtype but bf16/f16, and `DISTILL_CUBLAS=off`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use super::contiguous;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublas::sys as blas;
use cudarc::driver::sys as cu;

use super::stream::{self, Ordering, lock, ordering, run_on_stream, set_ordering};

type CudaTensor = CubeTensor<CudaRuntime>;

static LOADED: OnceLock<bool> = OnceLock::new();

/// One line on what the GEMMs do now: for logs and the GPU tests.
pub fn describe() -> String {
    let loaded = match LOADED.get() {
        None => "libcublas not tried yet",
        Some(true) => "libcublas loaded",
        Some(false) => "libcublas NOT loadable (burn matmul)",
    };
    format!(
        "cuBLAS ordering {:?}; {loaded}; last GEMM: {}",
        ordering(),
        stream::last_launch()
    )
}

fn cublas_loaded() -> bool {
    *LOADED.get_or_init(|| {
        // SAFETY: only tries to dlopen the candidate names cudarc would use.
        let ok = unsafe { blas::is_culib_present() };
        if !ok {
            eprintln!(
                "warning: libcublas could not be loaded (tried libcublas.so, libcublas.so.13, .12, .. \
                 on the loader's path; set LD_LIBRARY_PATH to its directory): GEMMs use burn's \
                 matmul, ~4x slower on H100"
            );
        }
        ok
    })
}

/// `a [m, k] @ b [k, n]` by cuBLAS, or the operands back when cuBLAS is not the tool:
/// not bf16/f16, mixed dtypes, quantized, empty or > i32 sizes, cuBLAS off or missing,
/// or a cuBLAS error (reported once, then cuBLAS is switched off).
#[allow(clippy::result_large_err)]
pub fn gemm(a: CudaTensor, b: CudaTensor) -> Result<CudaTensor, (CudaTensor, CudaTensor)> {
    if a.meta.rank() != 2 || b.meta.rank() != 2 {
        return Err((a, b));
    }
    let out = a.dtype;
    matmul(a, b, out, None).map_err(|(a, b, _)| (a, b))
}

/// Batched `a [.., m, k] @ b [.., k, n] -> [.., m, n]` (equal leading dims, e.g. [B, H]) by
/// `cublasGemmStridedBatchedEx`, the output in `out`: a's dtype, or F32 (cuBLAS writes the
/// f32 accumulator as is: no bf16 rounding, no cast kernel). `a` and `b` may be views
/// transposed in their last two dims (`swap_dims(2, 3)`): cuBLAS reads them with op flags.
/// Leading dims must step by one stride (contiguous [B*H] matrices, or a slice of heads in one
/// row); other layouts (e.g. heads split off [B, T, H, hd], broadcast dims) are copied to
/// contiguous first. The operands come back, as from [`gemm`], for what cuBLAS is not used for,
/// and also for unequal leading dims (burn's matmul broadcasts them) and an `out` other than
/// a's dtype or F32.
#[allow(clippy::result_large_err)]
pub fn bmm(a: CudaTensor, b: CudaTensor, out: DType) -> Result<CudaTensor, (CudaTensor, CudaTensor)> {
    if a.meta.rank() < 3 {
        return Err((a, b));
    }
    matmul(a, b, out, None).map_err(|(a, b, _)| (a, b))
}

/// `acc + a @ b` as [`bmm`] with the GEMM accumulating into `acc` (beta = 1): `acc` [.., m, n]
/// in f32 (or a's dtype), contiguous, and held nowhere else, since cuBLAS writes over it. The
/// three come back for what cuBLAS is not used for, as from [`bmm`], and for an `acc` that
/// does not meet those terms.
#[allow(clippy::result_large_err)]
pub fn bmm_accumulate(
    acc: CudaTensor,
    a: CudaTensor,
    b: CudaTensor,
) -> Result<CudaTensor, (CudaTensor, CudaTensor, CudaTensor)> {
    if a.meta.rank() < 3 {
        return Err((acc, a, b));
    }
    accumulate(acc, a, b)
}

/// `acc + a [m, k] @ b [k, n]` with the GEMM accumulating into `acc` [m, n] (beta = 1), on
/// the terms of [`bmm_accumulate`] (acc of a's dtype here); the three come back otherwise.
#[allow(clippy::result_large_err)]
pub fn gemm_accumulate(
    acc: CudaTensor,
    a: CudaTensor,
    b: CudaTensor,
) -> Result<CudaTensor, (CudaTensor, CudaTensor, CudaTensor)> {
    if a.meta.rank() != 2 || b.meta.rank() != 2 || acc.dtype != a.dtype {
        return Err((acc, a, b));
    }
    accumulate(acc, a, b)
}

/// [`bmm_accumulate`] and [`gemm_accumulate`] once their shapes are checked: the GEMM into
/// `acc`'s own buffer, which nothing else may hold.
#[allow(clippy::result_large_err)]
fn accumulate(
    acc: CudaTensor,
    a: CudaTensor,
    b: CudaTensor,
) -> Result<CudaTensor, (CudaTensor, CudaTensor, CudaTensor)> {
    if !acc.can_mut() {
        return Err((acc, a, b));
    }
    let out = acc.dtype;
    let sum = matmul(a, b, out, Some(acc)).map_err(|(a, b, acc)| (acc.expect("given"), a, b))?;
    ACCUMULATED.with(|n| n.set(n.get() + 1));
    Ok(sum)
}

thread_local! {
    static ISSUED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static ACCUMULATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many [`bmm_accumulate`] and [`gemm_accumulate`] calls this thread has run in the sum's
/// own buffer: lets a test tell that from the fallback, whose GEMM is a cuBLAS call too.
pub fn accumulated_on_this_thread() -> usize {
    ACCUMULATED.with(|n| n.get())
}

/// How many GEMMs this thread has handed to cuBLAS so far: lets a test tell a cuBLAS result
/// from a fallback to burn's matmul, which is numerically just as right.
pub fn issued_on_this_thread() -> usize {
    ISSUED.with(|n| n.get())
}

fn blas_type(d: DType) -> Option<blas::cudaDataType> {
    match d {
        DType::BF16 => Some(blas::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(blas::cudaDataType::CUDA_R_16F),
        DType::F32 => Some(blas::cudaDataType::CUDA_R_32F),
        _ => None,
    }
}

/// The operands handed back, and the accumulator if one was given.
type Refused = (CudaTensor, CudaTensor, Option<CudaTensor>);

/// [`gemm`], [`bmm`] and [`bmm_accumulate`]: rank >= 2, equal leading dims, each matrix
/// product by cuBLAS, into a new tensor of dtype `out` or added to `acc` (of that dtype).
#[allow(clippy::result_large_err)]
fn matmul(a: CudaTensor, b: CudaTensor, out: DType, acc: Option<CudaTensor>) -> Result<CudaTensor, Refused> {
    let mode = ordering();
    // Inputs bf16/f16 only: f32 inputs stay on burn's matmul, as the f32 path is the reference
    // the GPU tests hold our kernels to.
    let half = matches!(a.dtype, DType::BF16 | DType::F16);
    let (Some(ab_type), Some(c_type)) = (blas_type(a.dtype), blas_type(out)) else {
        return Err((a, b, acc));
    };
    let rank = a.meta.rank();
    let usable = mode != Ordering::Off
        && half
        && (out == a.dtype || out == DType::F32)
        && b.dtype == a.dtype
        && rank >= 2
        && b.meta.rank() == rank
        && a.meta.shape()[..rank - 2] == b.meta.shape()[..rank - 2]
        && a.qparams.is_none()
        && b.qparams.is_none()
        && a.device == b.device;
    if !usable {
        return Err((a, b, acc));
    }
    let fits = |d: usize| d > 0 && d <= i32::MAX as usize;
    let (m, k) = (a.meta.shape()[rank - 2], a.meta.shape()[rank - 1]);
    let (k_b, n) = (b.meta.shape()[rank - 2], b.meta.shape()[rank - 1]);
    let batch: usize = a.meta.shape()[..rank - 2].iter().product();
    if k != k_b || !fits(m) || !fits(n) || !fits(k) || !fits(batch) || !cublas_loaded() {
        return Err((a, b, acc));
    }

    let a = Operand::new(a);
    let b = Operand::new(b);
    let mut c_shape = a.tensor.meta.shape().clone();
    c_shape[rank - 1] = n;
    let accumulate = acc.is_some();
    let c = match acc {
        Some(acc) if acc.meta.shape() == &c_shape && acc.device == a.tensor.device => acc,
        Some(acc) => return Err((a.tensor, b.tensor, Some(acc))),
        None => empty_device_contiguous_dtype(a.tensor.client.clone(), a.tensor.device.clone(), c_shape, out),
    };
    let Some(c_layout) = layout(&c).filter(|l| !l.trans && l.ld >= n) else {
        return Err((a.tensor, b.tensor, accumulate.then_some(c)));
    };
    let stride = |s: usize| i64::try_from(s).ok();
    let (Some(stride_a), Some(stride_b), Some(stride_c)) = (
        stride(a.layout.batch_stride),
        stride(b.layout.batch_stride),
        stride(c_layout.batch_stride),
    ) else {
        return Err((a.tensor, b.tensor, accumulate.then_some(c)));
    };
    if !fits(a.layout.ld) || !fits(b.layout.ld) || !fits(c_layout.ld) {
        return Err((a.tensor, b.tensor, accumulate.then_some(c)));
    }
    let args = GemmArgs {
        m: m as i32,
        n: n as i32,
        k: k as i32,
        batch: batch as i32,
        trans_a: a.layout.trans,
        lda: a.layout.ld as i32,
        stride_a,
        trans_b: b.layout.trans,
        ldb: b.layout.ld as i32,
        stride_b,
        ldc: c_layout.ld as i32,
        stride_c,
        ab_type,
        c_type,
        beta: if accumulate { 1.0 } else { 0.0 },
        mode,
    };
    match launch(&a, &b, &c, args) {
        Ok(()) => {
            ISSUED.with(|n| n.set(n.get() + 1));
            Ok(c)
        }
        Err(e) => {
            eprintln!("warning: cuBLAS GEMM failed ({e}); GEMMs use burn's matmul from now on");
            set_ordering(Ordering::Off);
            Err((a.tensor, b.tensor, accumulate.then_some(c)))
        }
    }
}

/// An operand as cuBLAS sees it: see [`Layout`]. Anything else is made contiguous first.
struct Operand {
    tensor: CudaTensor,
    layout: Layout,
}

impl Operand {
    fn new(tensor: CudaTensor) -> Self {
        if let Some(layout) = layout(&tensor) {
            return Operand { tensor, layout };
        }
        let tensor = contiguous(tensor);
        let layout = layout(&tensor).expect("a contiguous tensor is row-major matrices at one stride");
        Operand { tensor, layout }
    }
}

/// How cuBLAS reads a [.., rows, cols] tensor in place: each matrix is either row-major
/// (`trans` false, row stride `ld`) or the row-major transpose of it (`trans` true: what
/// `swap_dims` of the last two dims of a contiguous tensor is), and matrix i of the flattened
/// leading dims starts `batch_stride` elements after matrix 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    trans: bool,
    ld: usize,
    batch_stride: usize,
}

fn layout(t: &CudaTensor) -> Option<Layout> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let r = shape.len();
    let (trans, ld) = layout_of([shape[r - 2], shape[r - 1]], [strides[r - 2], strides[r - 1]])?;
    let batch_stride = batch_stride_of(&shape[..r - 2], &strides[..r - 2])?;
    Some(Layout {
        trans,
        ld,
        batch_stride,
    })
}

/// (transposed, leading dimension) for a [rows, cols] view with these strides, if cuBLAS can
/// read it in place. cuBLAS needs ld >= cols (row-major) or >= rows (transposed).
fn layout_of([rows, cols]: [usize; 2], [s0, s1]: [usize; 2]) -> Option<(bool, usize)> {
    if (cols == 1 || s1 == 1) && (rows == 1 || s0 >= cols) {
        return Some((false, if rows == 1 { cols } else { s0 }));
    }
    if (rows == 1 || s0 == 1) && (cols == 1 || s1 >= rows) {
        return Some((true, if cols == 1 { rows } else { s1 }));
    }
    None
}

/// The one stride that steps through the leading dims in row-major order, if there is one:
/// size-1 dims are skipped, every other dim's stride must be the next inner one's times that
/// one's size. 0 when there is at most one matrix. None for a broadcast (zero stride) or
/// any other layout, e.g. [B, H] out of a [B, T, H, hd] by `swap_dims(1, 2)`.
fn batch_stride_of(dims: &[usize], strides: &[usize]) -> Option<usize> {
    let mut innermost = None;
    let mut next = None; // the stride the next outer dim must have
    for (&d, &s) in dims.iter().zip(strides).rev().filter(|&(&d, _)| d != 1) {
        match next {
            None if s > 0 => innermost = Some(s),
            Some(want) if s == want => {}
            _ => return None,
        }
        next = Some(s.checked_mul(d)?);
    }
    Some(innermost.unwrap_or(0))
}

#[derive(Clone, Copy, Debug)]
struct GemmArgs {
    m: i32,
    n: i32,
    k: i32,
    /// Matrices per operand; 1: `cublasGemmEx`, else `cublasGemmStridedBatchedEx`.
    batch: i32,
    trans_a: bool,
    lda: i32,
    stride_a: i64,
    trans_b: bool,
    ldb: i32,
    stride_b: i64,
    ldc: i32,
    stride_c: i64,
    /// A and B's element type.
    ab_type: blas::cudaDataType,
    /// C's: A's, or f32.
    c_type: blas::cudaDataType,
    /// 0: C = A B; 1: C += A B.
    beta: f32,
    mode: Ordering,
}

fn launch(a: &Operand, b: &Operand, c: &CudaTensor, args: GemmArgs) -> Result<(), String> {
    let index = c.device.index;
    let bindings = [
        a.tensor.handle.clone().binding(),
        b.tensor.handle.clone().binding(),
        c.handle.clone().binding(),
    ];
    run_on_stream(&c.device, bindings, args.mode, move |stream, ptrs| {
        gemm_on_stream(index, stream, ptrs, &args)
    })
}

/// One GEMM on device pointers, issued on `stream` from the device thread with the handle
/// kept for that stream.
fn gemm_on_stream(
    device: usize,
    stream: cu::CUstream,
    ptrs: [u64; 3],
    args: &GemmArgs,
) -> Result<(), String> {
    static HANDLES: OnceLock<Mutex<HashMap<(usize, usize), Handle>>> = OnceLock::new();
    let mut handles = lock(HANDLES.get_or_init(Default::default));
    let handle = match handles.entry((device, stream as usize)) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(v) => v.insert(Handle::new(stream)?),
    };
    handle.gemm(ptrs, args)
}

/// A row-major `x [m, k] @ w [k, n]` whose pointers a caller resolves itself: what a decoding
/// step issues many of in one device-thread task ([`super::decode`]). `w` is read as
/// [`weight_layout`] found it; x and the output are contiguous rows.
#[derive(Clone, Copy, Debug)]
pub(super) struct RowGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The output's row stride: n, or wider where the GEMM writes some columns of each row.
    pub ldc: usize,
    pub w: WeightLayout,
    pub dtype: DType,
    /// Added to the output's values (a residual) instead of writing over them.
    pub accumulate: bool,
}

impl RowGemm {
    /// Everything that decides what this GEMM does on `[x, w, out]`: what a replayed
    /// decoding step compares with its captured GEMM ([`super::graph::Issuer::other`]).
    pub(super) fn key(&self, [x, w, out]: [u64; 3]) -> [u64; 11] {
        let dtype = blas_type(self.dtype).map_or(u64::MAX, |t| t as u64);
        let [m, n, k, ldc, ld] = [self.m, self.n, self.k, self.ldc, self.w.ld].map(|d| d as u64);
        let flags = [self.w.trans, self.accumulate].map(u64::from);
        [x, w, out, m, n, k, ldc, ld, flags[0], flags[1], dtype]
    }
}

/// How cuBLAS reads a 2-D weight [k, n] in place: transposed (the tied LM head's view of the
/// embedding table) or not, and its leading dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WeightLayout {
    trans: bool,
    ld: usize,
}

/// `w`'s layout, if cuBLAS can read it in place and it is a bf16/f16 matrix, and cuBLAS is
/// in use on cubecl's stream.
pub(super) fn weight_layout(w: &CudaTensor) -> Option<WeightLayout> {
    let usable = w.meta.rank() == 2
        && matches!(w.dtype, DType::BF16 | DType::F16)
        && w.qparams.is_none()
        && ordering() == Ordering::Stream
        && cublas_loaded();
    let l = layout(w).filter(|_| usable)?;
    Some(WeightLayout {
        trans: l.trans,
        ld: l.ld,
    })
}

/// Issues `g` on `stream` (the device thread's, inside [`stream::run_on_stream_all`]):
/// `[x, w, out]` pointers.
pub(super) fn row_gemm(
    device: usize,
    stream: cu::CUstream,
    ptrs: [u64; 3],
    g: &RowGemm,
) -> Result<(), String> {
    let fits = |d: usize| d > 0 && d <= i32::MAX as usize;
    let ty = blas_type(g.dtype).ok_or_else(|| format!("cuBLAS takes no {:?}", g.dtype))?;
    if ![g.m, g.n, g.k, g.w.ld, g.ldc].into_iter().all(fits) || g.ldc < g.n {
        return Err(format!("GEMM sizes {g:?}"));
    }
    let args = GemmArgs {
        m: g.m as i32,
        n: g.n as i32,
        k: g.k as i32,
        batch: 1,
        trans_a: false,
        lda: g.k as i32,
        stride_a: 0,
        trans_b: g.w.trans,
        ldb: g.w.ld as i32,
        stride_b: 0,
        ldc: g.ldc as i32,
        stride_c: 0,
        ab_type: ty,
        c_type: ty,
        beta: if g.accumulate { 1.0 } else { 0.0 },
        mode: Ordering::Stream,
    };
    gemm_on_stream(device, stream, ptrs, &args)
}

/// A cuBLAS handle bound for good to one CUDA stream: a handle's default workspace must not
/// serve two streams at once. Used only on the device's runner thread.
struct Handle(blas::cublasHandle_t);

// SAFETY: the raw handles are only used on the device's runner thread, under a lock.
unsafe impl Send for Handle {}

impl Handle {
    fn new(stream: cu::CUstream) -> Result<Self, String> {
        let handle = cudarc::cublas::result::create_handle().map_err(|e| format!("cublasCreate: {e}"))?;
        // SAFETY: a fresh handle and a live stream of the current context.
        unsafe { cudarc::cublas::result::set_stream(handle, stream as blas::cudaStream_t) }
            .map_err(|e| format!("cublasSetStream: {e}"))?;
        Ok(Handle(handle))
    }

    /// Row-major C [m, n] = op(A) [m, k] @ op(B) [k, n], computed column-major as
    /// Cᵀ [n, m] = op(B)ᵀ @ op(A)ᵀ: the row-major memory of each operand is its column-major
    /// transpose, so cuBLAS gets B first, A second, and each one's own transpose flag.
    /// With `batch` > 1, the same for matrix i of each operand at i x its batch stride.
    fn gemm(&mut self, [a, b, c]: [u64; 3], g: &GemmArgs) -> Result<(), String> {
        let handle = self.0;
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, g.beta);
        let alpha = (&alpha as *const f32).cast::<c_void>();
        let beta = (&beta as *const f32).cast::<c_void>();
        let compute = blas::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: pointers come from live cubecl buffers of the sizes the shapes and batch
        // strides describe (the resources are held until after this call), leading dimensions
        // were checked against the shapes, alpha/beta are host f32 as CUBLAS_COMPUTE_32F expects.
        let done = unsafe {
            if g.batch == 1 {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    op(g.trans_b),
                    op(g.trans_a),
                    g.n,
                    g.m,
                    g.k,
                    alpha,
                    b as *const c_void,
                    g.ab_type,
                    g.ldb,
                    a as *const c_void,
                    g.ab_type,
                    g.lda,
                    beta,
                    c as *mut c_void,
                    g.c_type,
                    g.ldc,
                    compute,
                    algo,
                )
            } else {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    handle,
                    op(g.trans_b),
                    op(g.trans_a),
                    g.n,
                    g.m,
                    g.k,
                    alpha,
                    b as *const c_void,
                    g.ab_type,
                    g.ldb,
                    g.stride_b,
                    a as *const c_void,
                    g.ab_type,
                    g.lda,
                    g.stride_a,
                    beta,
                    c as *mut c_void,
                    g.c_type,
                    g.ldc,
                    g.stride_c,
                    g.batch,
                    compute,
                    algo,
                )
            }
        };
        done.map_err(|e| format!("cublasGemm(StridedBatched)Ex {g:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cublas_can_read_in_place() {
        // row-major, contiguous and pitched
        assert_eq!(layout_of([3, 4], [4, 1]), Some((false, 4)));
        assert_eq!(layout_of([3, 4], [8, 1]), Some((false, 8)));
        // transpose of a contiguous [4, 3]
        assert_eq!(layout_of([3, 4], [1, 3]), Some((true, 3)));
        // single row / column, any stride on the size-1 axis
        assert_eq!(layout_of([1, 4], [0, 1]), Some((false, 4)));
        assert_eq!(layout_of([4, 1], [1, 7]), Some((false, 1)));
        assert_eq!(layout_of([1, 4], [9, 5]), Some((true, 5)));
        // broadcast or strided: copy first
        assert_eq!(layout_of([3, 4], [0, 1]), None);
        assert_eq!(layout_of([3, 4], [8, 2]), None);
        assert_eq!(layout_of([3, 4], [1, 2]), None);
    }

    #[test]
    fn batch_strides_cublas_can_step() {
        // contiguous [B, H, 5, 7]; a 2-D tensor has no leading dims
        assert_eq!(batch_stride_of(&[2, 3], &[105, 35]), Some(35));
        assert_eq!(batch_stride_of(&[], &[]), Some(0));
        // heads 2..4 of one row of [4, 6, 5, 7]: the row stride no longer matters
        assert_eq!(batch_stride_of(&[1, 2], &[210, 35]), Some(35));
        // one matrix, whatever its strides
        assert_eq!(batch_stride_of(&[1, 1], &[0, 9]), Some(0));
        // rows with gaps between them, still one stride per matrix: [2, 3] of a [2, 4, ..] buffer
        assert_eq!(batch_stride_of(&[2, 3], &[140, 35]), None);
        // [B, T, H, hd].swap_dims(1, 2): heads hd apart, rows T*H*hd apart
        assert_eq!(batch_stride_of(&[2, 3], &[5 * 3 * 7, 7]), None);
        // broadcast over a dim: copy first
        assert_eq!(batch_stride_of(&[2, 3], &[35, 0]), None);
        assert_eq!(batch_stride_of(&[2, 3], &[0, 0]), None);
    }
}
