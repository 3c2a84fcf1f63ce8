//! [`crate::sample`]'s rule as one CUDA kernel: a block per row reads the row's logits a few
//! times (max; for top-k and top-p a bisection over the logits' order keys, each step a count
//! or a sum; the kept weight; the draw) and writes one id.
//!
//! Why: decoding with sampling copied every step's [b, V] logits to the host in f32 (64 x
//! 151,936 x 4 bytes at batch 64) and walked each row there, once or twice per token per
//! row; on-policy distillation's sampling ran at a fraction of greedy decoding's speed.
//!
//! The walk visits the kept tokens in id order, a contiguous chunk of ids per thread, and sums
//! in f64 as the host reference does, so a uniform picks the same token as the reference
//! unless f64 rounding of the sums (added in another order) moves a boundary. The kernel is deterministic: the
//! reductions have a fixed shape and the one winner of the draw is the lowest thread whose
//! chunk holds the target.

use std::sync::{Arc, Mutex};

use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::sys as cu;

use super::nvrtc::{self, Arg, Launch};
use super::stream::{self, lock};
use crate::sample::RowSampling;

type CudaTensor = CubeTensor<CudaRuntime>;

/// Threads per row's block.
const THREADS: u32 = 1024;

const SOURCE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

/* crate::sample::order_key, with -0 as +0 (equal floats, one key). */
__device__ __forceinline__ unsigned int order_key(float x) {
    if (x == 0.f) x = 0.f;
    const unsigned int b = __float_as_uint(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

/* Sums over the block; every thread gets the total. `buf`: 32 doubles of shared memory. */
__device__ double block_sum(double x, double* buf) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    x = lane < warps ? buf[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

/* crate::sample's weight: exp of the f32 tempered logit, in f64. */
__device__ __forceinline__ double weight(float x, float m, float inv_t) {
    return exp((double)((x - m) * inv_t));
}

__device__ int block_max_int(int x, int* buf) {
    for (int off = 16; off > 0; off >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) buf[warp] = x;
    __syncthreads();
    x = lane < warps ? buf[lane] : -1;
    for (int off = 16; off > 0; off >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

/* (m, i) <- the larger value, ties to the lower index (torch.argmax's first maximum). */
__device__ __forceinline__ void arg_combine(float& m, int& i, float m2, int i2) {
    if (m2 > m || (m2 == m && i2 < i)) { m = m2; i = i2; }
}

__device__ void block_argmax(float& m, int& i, float* fbuf, int* ibuf) {
    for (int off = 16; off > 0; off >>= 1)
        arg_combine(m, i, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, i, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { fbuf[warp] = m; ibuf[warp] = i; }
    __syncthreads();
    m = lane < warps ? fbuf[lane] : NEG_INF;
    i = lane < warps ? ibuf[lane] : 0x7fffffff;
    for (int off = 16; off > 0; off >>= 1)
        arg_combine(m, i, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, i, off));
}

/* Exclusive prefix sum over the block in thread order. `buf`: 32 doubles. */
__device__ double block_exclusive_scan(double x, double* buf) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    double inc = x;
    for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, inc, off);
        if (lane >= off) inc += y;
    }
    __syncthreads();
    if (lane == 31) buf[warp] = inc;
    __syncthreads();
    double before = 0.0;
    for (int w = 0; w < warp && w < warps; ++w) before += buf[w];
    return before + inc - x;
}

/* One block per row of z [rows, ld] (bf16 or f32), candidates in columns < v. params [rows, 4]:
 * temperature, top_k, top_p, uniform. out [rows]: the drawn id. */
extern "C" __global__ void sample_rows(const void* z, int z_bf16, i64 ld, int v,
                                       const float* params, int* out)
{
    __shared__ float fbuf[32];
    __shared__ double dbuf[32];
    __shared__ int ibuf[32];
    __shared__ int winner;
    const i64 base = (i64)blockIdx.x * ld;
    const float t = params[blockIdx.x * 4], top_p = params[blockIdx.x * 4 + 2];
    const float u = params[blockIdx.x * 4 + 3];
    const int k = (int)params[blockIdx.x * 4 + 1];

    float m = NEG_INF;
    int mi = 0x7fffffff;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = load(z, z_bf16, base + j);
        if (x > m) { m = x; mi = j; }
    }
    block_argmax(m, mi, fbuf, ibuf);
    if (t <= 0.f) {
        if (threadIdx.x == 0) out[blockIdx.x] = mi;
        return;
    }
    const float inv_t = 1.f / t;

    /* The smallest kept key: all, then top-k's, then top-p's. */
    unsigned int floor_key = 0;
    if (k > 0 && k < v) {
        unsigned int lo = 0, hi = order_key(m);
        while (lo < hi) {  /* the largest key with at least k logits at or above it */
            const unsigned int mid = (unsigned int)(((unsigned long long)lo + hi + 1) >> 1);
            double n = 0.0;
            for (int j = threadIdx.x; j < v; j += blockDim.x)
                n += order_key(load(z, z_bf16, base + j)) >= mid ? 1.0 : 0.0;
            if (block_sum(n, dbuf) >= (double)k) lo = mid; else hi = mid - 1;
        }
        floor_key = lo;
    }
    if (top_p < 1.f) {
        double mass = 0.0;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float x = load(z, z_bf16, base + j);
            if (order_key(x) >= floor_key) mass += weight(x, m, inv_t);
        }
        const double goal = (double)top_p * block_sum(mass, dbuf);
        unsigned int lo = floor_key, hi = order_key(m);
        while (lo < hi) {  /* the largest key whose logits at or above it hold the goal */
            const unsigned int mid = (unsigned int)(((unsigned long long)lo + hi + 1) >> 1);
            double s = 0.0;
            for (int j = threadIdx.x; j < v; j += blockDim.x) {
                const float x = load(z, z_bf16, base + j);
                if (order_key(x) >= mid) s += weight(x, m, inv_t);
            }
            if (block_sum(s, dbuf) >= goal) lo = mid; else hi = mid - 1;
        }
        floor_key = lo;
    }

    /* The draw: thread i walks ids [i * chunk, (i + 1) * chunk) in order. */
    const int chunk = (v + blockDim.x - 1) / blockDim.x;
    const int j0 = min(v, (int)threadIdx.x * chunk), j1 = min(v, j0 + chunk);
    double c = 0.0;
    int last = -1;
    for (int j = j0; j < j1; ++j) {
        const float x = load(z, z_bf16, base + j);
        if (order_key(x) < floor_key) continue;
        const double w = weight(x, m, inv_t);
        c += w;
        if (w > 0.0) last = j;
    }
    const double before = block_exclusive_scan(c, dbuf);
    const double target = (double)u * block_sum(c, dbuf);
    const int last_kept = block_max_int(last, ibuf);
    if (threadIdx.x == 0) winner = 0x7fffffff;
    __syncthreads();
    if (c > 0.0 && before <= target && target < before + c) atomicMin(&winner, (int)threadIdx.x);
    __syncthreads();
    if (winner == 0x7fffffff) {
        if (threadIdx.x == 0) out[blockIdx.x] = last_kept;
    } else if (winner == (int)threadIdx.x) {
        double acc = before;
        int pick = last;
        for (int j = j0; j < j1; ++j) {
            const float x = load(z, z_bf16, base + j);
            if (order_key(x) < floor_key) continue;
            acc += weight(x, m, inv_t);
            if (target < acc) { pick = j; break; }
        }
        out[blockIdx.x] = pick;
    }
}
"#;

fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "sample_rows".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["sample_rows"],
        dynamic_smem: 0,
    }
}

/// Draws one id per row of `logits` [b, V] (bf16 or f32, rows contiguous) among its first
/// `vocab` columns; `params` [b, 4] f32 holds each row's [`RowSampling`] in the kernel's
/// order ([`params`]). Returns the ids, [b] i32, on the device.
pub fn sample_rows(logits: &CudaTensor, vocab: usize, params: &CudaTensor) -> Result<CudaTensor, String> {
    let shape = logits.meta.shape().as_slice().to_vec();
    let strides = logits.meta.strides().to_vec();
    if shape.len() != 2 || strides[1] != 1 {
        return Err(format!("logits {shape:?} with strides {strides:?}"));
    }
    let (b, v) = (shape[0], vocab.min(shape[1]));
    if b == 0 || v == 0 {
        return Err("empty".into());
    }
    if params.dtype != DType::F32 || params.meta.shape().as_slice() != [b, 4] {
        return Err(format!("params {:?} {:?}", params.dtype, params.meta.shape()));
    }
    let bf16 = nvrtc::dtype_flag(logits.dtype, "logits")?;
    let v = i32::try_from(v).map_err(|_| format!("{v} candidates"))?;
    let grid = u32::try_from(b).map_err(|_| format!("{b} rows"))?;
    nvrtc::ensure_loaded(&logits.device, module())?;
    let (client, device) = (logits.client.clone(), logits.device.clone());
    let out = empty_device_contiguous_dtype(client, device.clone(), vec![b].into(), DType::I32);
    let bindings = [
        logits.handle.clone().binding(),
        params.handle.clone().binding(),
        out.handle.clone().binding(),
    ];
    // The logits' own start: a narrowed view may begin past its buffer's.
    let offset = logits.handle.offset_start.unwrap_or(0);
    if offset != 0 {
        return Err(format!("logits start {offset} bytes into their buffer"));
    }
    let ld = strides[0] as i64;
    let index = device.index;
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, [z, p, o]| {
        use Arg::*;
        let how = Launch {
            grid: (grid, 1, 1),
            threads: THREADS,
            dynamic_smem: 0,
        };
        let args = [Ptr(z), I32(bf16), I64(ld), I32(v), Ptr(p), Ptr(o)];
        nvrtc::launch(index, &module(), "sample_rows", how, stream, &args)
    })?;
    Ok(out)
}

/// The kernel's per-row parameters, [b, 4] row-major: temperature, top_k, top_p, uniform.
pub fn params(rows: &[RowSampling]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| [r.temperature, r.top_k as f32, r.top_p, r.uniform])
        .collect()
}

/// Starts copying sampled `ids` (i32 [B]) to pinned host memory on cubecl's stream, after the
/// work queued before (the step that drew them). The returned read waits for that copy alone,
/// so the next step, queued in the meantime, runs on the GPU while the host reads.
pub(crate) fn read_ahead(ids: &CudaTensor) -> Result<crate::PendingIds, String> {
    let b = match ids.meta.shape().as_slice() {
        &[b] if ids.dtype == DType::I32 && ids.is_contiguous() && b > 0 => b,
        s => return Err(format!("ids: {:?} {s:?}, not i32 [B]", ids.dtype)),
    };
    let copying: Arc<Mutex<Option<Copying>>> = Arc::default();
    let queued = copying.clone();
    let binding = vec![ids.handle.clone().binding()];
    stream::run_on_stream_all(&ids.device, binding, nvrtc::ordering(), move |stream, p| {
        *lock(&queued) = Some(Copying::start(p[0], b, stream)?);
        Ok(())
    })?;
    let device = ids.device.clone();
    Ok(crate::PendingIds::waiting(move || {
        stream::on_device_thread(&device, move || {
            let started = lock(&copying).take().ok_or("the ids' copy to the host failed")?;
            started.finish()
        })?
    }))
}

/// A copy of `n` ids into a pinned buffer, and the event after it.
struct Copying {
    /// Taken when the copy is waited for.
    host: Option<Pinned>,
    event: cu::CUevent,
    n: usize,
    context: cu::CUcontext,
}

// SAFETY: made and finished on cubecl's device thread; only moved between them in a Mutex.
unsafe impl Send for Copying {}

impl Copying {
    /// Queues the copy of `n` i32 at `src` on `stream` (on the device thread).
    fn start(src: u64, n: usize, stream: cu::CUstream) -> Result<Self, String> {
        let host = Pinned::take(n * 4)?;
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let event =
            cudarc::driver::result::event::create(flags).map_err(|e| format!("cuEventCreate: {e}"))?;
        let mut context = std::ptr::null_mut();
        // SAFETY: `host` holds n * 4 pinned bytes, `src` n i32 of a buffer bound for this task;
        // the event and stream are live, `context` an out-pointer.
        unsafe {
            cu::cuCtxGetCurrent(&mut context)
                .result()
                .map_err(|e| format!("cuCtxGetCurrent: {e}"))?;
            cu::cuMemcpyDtoHAsync_v2(host.ptr as *mut std::ffi::c_void, src, n * 4, stream)
                .result()
                .map_err(|e| format!("ids to the host: {e}"))?;
            cudarc::driver::result::event::record(event, stream)
                .map_err(|e| format!("cuEventRecord: {e}"))?;
        }
        Ok(Copying {
            host: Some(host),
            event,
            n,
            context,
        })
    }

    /// Waits for the copy and returns the ids.
    fn finish(mut self) -> Result<Vec<u32>, String> {
        // SAFETY: the context the copy was queued in; the event was recorded after the copy.
        unsafe {
            cu::cuCtxSetCurrent(self.context)
                .result()
                .map_err(|e| format!("cuCtxSetCurrent: {e}"))?;
            cu::cuEventSynchronize(self.event)
                .result()
                .map_err(|e| format!("waiting for the ids: {e}"))?;
        }
        let host = self.host.take().ok_or("the ids were read already")?;
        // SAFETY: the copy is done: `host` holds its n i32.
        let ids = unsafe { std::slice::from_raw_parts(host.ptr as *const i32, self.n) }.to_vec();
        ids.into_iter()
            .map(|t| u32::try_from(t).map_err(|_| format!("sampled id {t}")))
            .collect()
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        // Never waited for: the GPU may still write the buffer, so it stays out of the pool (a
        // page, kept for the process).
        std::mem::forget(self.host.take());
        // SAFETY: created by this copy, destroyed once.
        let _ = unsafe { cudarc::driver::result::event::destroy(self.event) };
    }
}

/// A page of pinned host memory, from a pool that keeps them for the next copy.
struct Pinned {
    ptr: usize,
    bytes: usize,
}

static PINNED: Mutex<Vec<Pinned>> = Mutex::new(Vec::new());

impl Pinned {
    /// A pinned buffer of at least `bytes` (with a context current).
    fn take(bytes: usize) -> Result<Self, String> {
        let mut pool = lock(&PINNED);
        if let Some(i) = pool.iter().position(|p| p.bytes >= bytes) {
            return Ok(pool.swap_remove(i));
        }
        let bytes = bytes.next_multiple_of(4096);
        let mut ptr = std::ptr::null_mut();
        // SAFETY: an out-pointer for a new allocation of `bytes`.
        unsafe { cu::cuMemAllocHost_v2(&mut ptr, bytes) }
            .result()
            .map_err(|e| format!("cuMemAllocHost: {e}"))?;
        Ok(Pinned {
            ptr: ptr as usize,
            bytes,
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Back to the pool: a few pages at most, kept for the process's life.
        let page = Pinned {
            ptr: std::mem::replace(&mut self.ptr, 0),
            bytes: self.bytes,
        };
        if page.ptr != 0 {
            lock(&PINNED).push(page);
        }
    }
}
