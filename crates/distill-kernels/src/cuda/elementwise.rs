//! RMSNorm and SwiGLU, forward and backward, and rotary embeddings as CUDA kernels
//! ([`crate::ModelKernels::rms_norm`], [`crate::ModelKernels::swiglu`], their backward methods,
//! [`crate::ModelKernels::rope`]), for bf16 or f32 tensors.
//!
//! Why: as burn ops each is a chain of elementwise passes, most of them in f32 (cast, sigmoid
//! as five ops, products, casts back). At 0.5B, 4 x 2048 tokens, SwiGLU over [8192, 4864]
//! took about 1 ms a layer forward and 2.4 ms backward, RMSNorm about 0.35 ms per backward:
//! about 90 of a 266 ms step on the H100 (nsys). One kernel reads each input once and writes
//! each output once.
//!
//! Rounding follows PyTorch's bf16 modules: RMSNorm rounds x · inv_rms to the storage dtype
//! before the weight (HF's `weight * hidden.to(input_dtype)`), SwiGLU rounds silu(gate) once
//! (burn's op rounds sigmoid, then the product); the backward passes work in f32 and round
//! each gradient once. RoPE rounds cos and sin to the storage dtype (transformers' `cos.to(dtype)`)
//! and each output once.

use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::flash::Paging;
use super::nvrtc::{self, Arg, Call, Launch};
use super::{contiguous, stream};

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* v as the storage dtype holds it. */
__device__ __forceinline__ float rounded(int bf16, float v) {
    return bf16 ? __uint_as_float(((unsigned int)to_bf16(v)) << 16) : v;
}

/* (x1, x2) = x[j], x[j + half] rotated by the tables' entries at tab and tab + half, which are
 * rounded to the storage dtype first (transformers' cos.to(dtype)). */
__device__ __forceinline__ float2 rotate(int bf16, int tab_bf16, const void* cos, const void* sin, i64 tab,
                                         int half, float x1, float x2)
{
    const float c1 = rounded(bf16, load(cos, tab_bf16, tab)), c2 = rounded(bf16, load(cos, tab_bf16, tab + half));
    const float s1 = rounded(bf16, load(sin, tab_bf16, tab)), s2 = rounded(bf16, load(sin, tab_bf16, tab + half));
    return make_float2(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2);
}

/* One warp per row of x [rows, c]: y = round(round(x * inv_rms) * w). Each lane has four
 * loads in flight at a time: a decode step's few rows are a warp each, and one load after
 * another made the kernel the latency of c / 32 loads in a row. */
extern "C" __global__ void rms_norm(const void* x, const void* w, void* y, int bf16, int rows, int c,
                                    float eps)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const i64 base = (i64)row * c;
    float ss = 0.f;
    for (int j0 = lane; j0 < c; j0 += 128) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int j = j0 + 32 * u;
            v[u] = j < c ? load(x, bf16, base + j) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) ss += v[u] * v[u];
    }
    const float inv = 1.f / sqrtf(warp_sum(ss) / c + eps);
    for (int j0 = lane; j0 < c; j0 += 128) {
        float v[4], g[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int j = j0 + 32 * u;
            v[u] = j < c ? load(x, bf16, base + j) : 0.f;
            g[u] = j < c ? load(w, bf16, j) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int j = j0 + 32 * u;
            if (j < c) store(y, bf16, base + j, rounded(bf16, v[u] * inv) * g[u]);
        }
    }
}

/* rms_norm with a CTA of WIDE_NT threads per row, for the few rows of a decoding step: a warp
 * per row left most of the GPU idle there, waiting on c / 128 rounds of loads one after
 * another. A thread holds its up to WIDE_PER elements in registers between the two passes,
 * so c <= WIDE_NT * WIDE_PER. */
#define WIDE_NT 256
#define WIDE_PER 16
extern "C" __global__ void __launch_bounds__(WIDE_NT) rms_norm_wide(const void* x, const void* w, void* y, int bf16,
                                                                     int rows, int c, float eps)
{
    __shared__ float partial[WIDE_NT / 32];
    const int tid = threadIdx.x;
    const i64 base = (i64)blockIdx.x * c;
    float v[WIDE_PER], ss = 0.f;
#pragma unroll
    for (int u = 0; u < WIDE_PER; u++) {
        const int j = tid + u * WIDE_NT;
        v[u] = j < c ? load(x, bf16, base + j) : 0.f;
        ss += v[u] * v[u];
    }
    ss = warp_sum(ss);
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WIDE_NT / 32; i++) total += partial[i];
    const float inv = 1.f / sqrtf(total / c + eps);
#pragma unroll
    for (int u = 0; u < WIDE_PER; u++) {
        const int j = tid + u * WIDE_NT;
        if (j < c) store(y, bf16, base + j, rounded(bf16, v[u] * inv) * load(w, bf16, j));
    }
}

/* One warp per row. With g = dy * w and n = x * inv_rms:
 *     dx = inv_rms * (g - n * mean(g * n)) = inv_rms * (g - x * inv_rms^2 * sum(g * x) / c),
 * and inv_rms per row for rms_norm_dw. */
extern "C" __global__ void rms_norm_dx(const void* x, const void* w, const void* dy, void* dx,
                                       float* inv_out, int bf16, int rows, int c, float eps)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;
    const i64 base = (i64)row * c;
    float ss = 0.f, gx = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float v = load(x, bf16, base + j);
        ss += v * v;
        gx += load(dy, bf16, base + j) * load(w, bf16, j) * v;
    }
    const float inv = 1.f / sqrtf(warp_sum(ss) / c + eps);
    const float k = inv * inv * warp_sum(gx) / c;
    for (int j = lane; j < c; j += 32) {
        const float g = load(dy, bf16, base + j) * load(w, bf16, j);
        store(dx, bf16, base + j, inv * (g - load(x, bf16, base + j) * k));
    }
    if (lane == 0) inv_out[row] = inv;
}

/* dw[j] = sum over rows of dy[r, j] * round(x[r, j] * inv[r]): one thread per column and
 * chunk of rows (blockIdx.y), partial sums [chunks, c] in f32. */
extern "C" __global__ void rms_norm_dw(const void* x, const void* dy, const float* inv, float* partial,
                                       int bf16, int rows, int c, int chunk)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float acc = 0.f;
    for (int r = r0; r < r1; r++) {
        const i64 i = (i64)r * c + j;
        acc += load(dy, bf16, i) * rounded(bf16, load(x, bf16, i) * inv[r]);
    }
    partial[(i64)blockIdx.y * c + j] = acc;
}

/* y = round(silu(gate)) * up over rows of c columns; gate's and up's rows start ld_gate and
 * ld_up elements apart (column views of one fused projection), y's c apart. */
extern "C" __global__ void swiglu(const void* gate, const void* up, void* y, int bf16, i64 n, i64 c,
                                  i64 ld_gate, i64 ld_up)
{
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / c, j = i - r * c;
        const float g = load(gate, bf16, r * ld_gate + j);
        store(y, bf16, i, rounded(bf16, g / (1.f + expf(-g))) * load(up, bf16, r * ld_up + j));
    }
}

/* With s = sigmoid(gate): d_up = dy * gate * s, d_gate = dy * up * s * (1 + gate * (1 - s)). */
extern "C" __global__ void swiglu_backward(const void* gate, const void* up, const void* dy, void* d_gate,
                                           void* d_up, int bf16, i64 n)
{
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float g = load(gate, bf16, i), d = load(dy, bf16, i);
        const float s = 1.f / (1.f + expf(-g));
        store(d_up, bf16, i, d * g * s);
        store(d_gate, bf16, i, d * load(up, bf16, i) * s * (1.f + g * (1.f - s)));
    }
}

/* y = x * cos + rotate_half(x) * sin over the last dim (hd = 2 half); x [B, H, T, hd] with
 * strides (xb, xh, xt, 1), y likewise (yb, yh, yt, 1); cos, sin [R, T, hd], R = B or 1
 * (shared). One thread per pair (j, j + half). */
extern "C" __global__ void rope(const void* x, void* y, const void* cos, const void* sin, int bf16,
                                int tab_bf16, int heads, int t_len, int half, int shared, int pairs,
                                i64 xb, i64 xh, i64 xt, i64 yb, i64 yh, i64 yt)
{
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += gridDim.x * blockDim.x) {
        const int j = p % half;
        int q = p / half;
        const int t = q % t_len;
        q /= t_len;
        const int h = q % heads, b = q / heads;
        const i64 xi = b * xb + h * xh + t * xt + j, yi = b * yb + h * yh + t * yt + j;
        const i64 tab = ((i64)(shared ? 0 : b) * t_len + t) * (2 * half) + j;
        const float2 o = rotate(bf16, tab_bf16, cos, sin, tab, half, load(x, bf16, xi), load(x, bf16, xi + half));
        store(y, bf16, yi, o.x);
        store(y, bf16, yi + half, o.y);
    }
}

/* A cached step's attention inputs from one fused projection y [B, T, (H + 2 KV) hd]
 * (contiguous) plus bias (or null): each head's pair (j, j + half) of y + bias, rounded to the
 * storage dtype as the separate bias add rounds it; q heads rotated into q [B, T, H, hd], k
 * heads rotated and v heads as they are into the caches [B, KV, cap, hd] at position at + t.
 * Tables as in rope. One thread per pair. */
extern "C" __global__ void rope_qkv(const void* y, const void* bias, void* q, void* k_cache, void* v_cache,
                                    const void* cos, const void* sin, int bf16, int tab_bf16, int heads,
                                    int kv_heads, int t_len, int half, int shared, int pairs, i64 cap, i64 at,
                                    const int* table, int table_ld, const int* shift, int page_len)
{
    const int all = heads + 2 * kv_heads, hd = 2 * half;
    /* Where row b's position at + t sits in a cache [B, KV, cap, hd], or with a page table in
     * a pool of slots [slots, KV, hd] (flash_decode's paged layout): head kvh's offset is
     * then added as kvh * hd, not kvh * cap * hd. */
#define CACHE_AT(b, kvh, t)                                                                        \
    (table ? (((i64)table[(i64)(b) * table_ld + (at + (t) + shift[b]) / page_len] * page_len +        \
               (at + (t) + shift[b]) % page_len) * kv_heads + (kvh)) * hd                              \
           : (((i64)(b) * kv_heads + (kvh)) * cap + at + (t)) * hd)
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += gridDim.x * blockDim.x) {
        const int j = p % half;
        int r = p / half;
        const int head = r % all;
        r /= all;
        const int t = r % t_len, b = r / t_len;
        const i64 yi = ((i64)b * t_len + t) * all * hd + (i64)head * hd + j;
        float x1 = load(y, bf16, yi), x2 = load(y, bf16, yi + half);
        if (bias) {
            x1 = rounded(bf16, x1 + load(bias, bf16, (i64)head * hd + j));
            x2 = rounded(bf16, x2 + load(bias, bf16, (i64)head * hd + j + half));
        }
        if (head >= heads + kv_heads) {
            const i64 vi = CACHE_AT(b, head - heads - kv_heads, t) + j;
            store(v_cache, bf16, vi, x1);
            store(v_cache, bf16, vi + half, x2);
            continue;
        }
        const i64 tab = ((i64)(shared ? 0 : b) * t_len + t) * hd + j;
        const float2 o = rotate(bf16, tab_bf16, cos, sin, tab, half, x1, x2);
        const i64 oi = head < heads ? (((i64)b * t_len + t) * heads + head) * hd + j
                                    : CACHE_AT(b, head - heads, t) + j;
        void* out = head < heads ? q : k_cache;
        store(out, bf16, oi, o.x);
        store(out, bf16, oi + half, o.y);
    }
#undef CACHE_AT
}
"#;

pub(super) fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "elementwise".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &[
            "rms_norm",
            "rms_norm_wide",
            "rms_norm_dx",
            "rms_norm_dw",
            "swiglu",
            "swiglu_backward",
            "rope",
            "rope_qkv",
        ],
        dynamic_smem: 0,
    }
}

/// Up to this many rows (a decoding step's), RMSNorm takes a CTA of `WIDE_THREADS` a row
/// (`rms_norm_wide`), for rows of at most `WIDE_C` elements (`WIDE_NT` and
/// `WIDE_NT * WIDE_PER` in the source).
const WIDE_ROWS: usize = 512;
const WIDE_THREADS: u32 = 256;
const WIDE_C: usize = WIDE_THREADS as usize * 16;

/// Rows of a warp-per-row kernel per 256-thread block.
const ROWS_PER_BLOCK: usize = 8;

/// The inputs made contiguous, after checking they share one dtype (bf16 or f32) and the
/// shape `dims` gives (None: any); returns them with the kernels' bf16 flag.
fn inputs<const N: usize>(
    ts: [(&CudaTensor, &str, Option<&[usize]>); N],
) -> Result<([CudaTensor; N], i32), String> {
    let dtype = ts[0].0.dtype;
    let bf16 = nvrtc::dtype_flag(dtype, ts[0].1)?;
    for (t, what, dims) in &ts {
        if t.dtype != dtype {
            return Err(format!("{what} is {:?}, {} {dtype:?}", t.dtype, ts[0].1));
        }
        if let Some(dims) = dims
            && t.meta.shape().as_slice() != *dims
        {
            return Err(format!(
                "{what}: shape {:?}, want {dims:?}",
                t.meta.shape().as_slice()
            ));
        }
    }
    Ok((ts.map(|(t, _, _)| contiguous(t.clone())), bf16))
}

fn like(t: &CudaTensor, dims: &[usize], dtype: DType) -> CudaTensor {
    empty_device_contiguous_dtype(t.client.clone(), t.device.clone(), dims.to_vec().into(), dtype)
}

/// (rows, c) of x [.., c], with c as the weight's length.
fn rows_of(x: &CudaTensor, w: &CudaTensor) -> Result<(usize, usize), String> {
    let dims = x.meta.shape().as_slice().to_vec();
    let c = *dims.last().ok_or("x has rank 0")?;
    let rows = dims[..dims.len() - 1].iter().product::<usize>();
    if w.meta.shape().as_slice() != [c] || c == 0 || rows == 0 || rows > i32::MAX as usize {
        return Err(format!("x {dims:?}, weight {:?}", w.meta.shape().as_slice()));
    }
    Ok((rows, c))
}

fn warp_rows(rows: usize) -> Launch {
    Launch {
        grid: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        threads: 32 * ROWS_PER_BLOCK as u32,
        dynamic_smem: 0,
    }
}

/// RMSNorm of x [.., C] with weight [C] over the last dim, in x's shape and dtype.
pub fn rms_norm(x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor, String> {
    let (rows, c) = rows_of(x, w)?;
    let ([x, w], bf16) = inputs([(x, "x", None), (w, "weight", None)])?;
    nvrtc::ensure_loaded(&x.device, module())?;
    let y = like(&x, x.meta.shape().as_slice(), x.dtype);
    let device = x.device.clone();
    let bindings = [&x, &w, &y].map(|t| t.handle.clone().binding());
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        rms_norm_call(ptrs, bf16, rows, c, eps).launch(device.index, &module(), stream)
    })?;
    Ok(y)
}

/// The `rms_norm` kernel over `[x, weight, y]`: `rows` rows of `c`.
pub(super) fn rms_norm_call([px, pw, py]: [u64; 3], bf16: i32, rows: usize, c: usize, eps: f32) -> Call {
    use Arg::*;
    let (name, how) = if rows <= WIDE_ROWS && c <= WIDE_C {
        let how = Launch {
            grid: (rows as u32, 1, 1),
            threads: WIDE_THREADS,
            dynamic_smem: 0,
        };
        ("rms_norm_wide", how)
    } else {
        ("rms_norm", warp_rows(rows))
    };
    Call {
        name,
        how,
        args: vec![
            Ptr(px),
            Ptr(pw),
            Ptr(py),
            I32(bf16),
            I32(rows as i32),
            I32(c as i32),
            F32(eps),
        ],
    }
}

/// The backward of [`rms_norm`]: dx in x's shape and dtype, and dw as f32 partial sums
/// [chunks, C] for the caller to sum over chunks.
pub fn rms_norm_backward(
    x: &CudaTensor,
    w: &CudaTensor,
    dy: &CudaTensor,
    eps: f32,
) -> Result<(CudaTensor, CudaTensor), String> {
    let (rows, c) = rows_of(x, w)?;
    let shape = x.meta.shape().as_slice().to_vec();
    let ([x, w, dy], bf16) = inputs([(x, "x", None), (w, "weight", None), (dy, "dy", Some(&shape))])?;
    nvrtc::ensure_loaded(&x.device, module())?;
    // Enough chunks of rows to fill the GPU with a few columns' blocks; at most 64 rows each.
    let chunk = rows.div_ceil(rows.div_ceil(64).clamp(1, 512));
    let chunks = rows.div_ceil(chunk);
    let dx = like(&x, &shape, x.dtype);
    let inv = like(&x, &[rows], DType::F32);
    let partial = like(&x, &[chunks, c], DType::F32);
    let device = x.device.clone();
    let bindings = [&x, &w, &dy, &dx, &inv, &partial].map(|t| t.handle.clone().binding());
    let dx_launch = warp_rows(rows);
    let dw_launch = Launch {
        grid: (c.div_ceil(256) as u32, chunks as u32, 1),
        threads: 256,
        dynamic_smem: 0,
    };
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [px, pw, pdy, pdx, pinv, ppart]| {
            use Arg::*;
            let (rows, c) = (I32(rows as i32), I32(c as i32));
            let args = [
                Ptr(px),
                Ptr(pw),
                Ptr(pdy),
                Ptr(pdx),
                Ptr(pinv),
                I32(bf16),
                rows,
                c,
                F32(eps),
            ];
            nvrtc::launch(device.index, &module(), "rms_norm_dx", dx_launch, stream, &args)?;
            let args = [
                Ptr(px),
                Ptr(pdy),
                Ptr(pinv),
                Ptr(ppart),
                I32(bf16),
                rows,
                c,
                I32(chunk as i32),
            ];
            nvrtc::launch(device.index, &module(), "rms_norm_dw", dw_launch, stream, &args)
        },
    )?;
    Ok((dx, partial))
}

/// silu(gate) · up, in gate's shape and dtype. gate and up may be views whose rows are
/// apart by more than their width ([`row_stride`]), read in place.
pub fn swiglu(gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor, String> {
    let shape = gate.meta.shape().as_slice().to_vec();
    let rowed = |t: &CudaTensor| match row_stride(t) {
        Some(ld) => (t.clone(), ld),
        None => (contiguous(t.clone()), *shape.last().unwrap_or(&0)),
    };
    let ((gate, ld_gate), (up, ld_up)) = (rowed(gate), rowed(up));
    let bf16 = nvrtc::dtype_flag(gate.dtype, "gate")?;
    if up.dtype != gate.dtype || up.meta.shape().as_slice() != shape.as_slice() {
        return Err(format!(
            "up: {:?} {:?}, gate {:?} {shape:?}",
            up.dtype,
            up.meta.shape().as_slice(),
            gate.dtype
        ));
    }
    let n = shape.iter().product::<usize>();
    if n == 0 {
        return Err("empty".into());
    }
    let c = shape[shape.len() - 1];
    nvrtc::ensure_loaded(&gate.device, module())?;
    let y = like(&gate, &shape, gate.dtype);
    let device = gate.device.clone();
    let bindings = [&gate, &up, &y].map(|t| t.handle.clone().binding());
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        swiglu_call(ptrs, bf16, n, c, [ld_gate, ld_up]).launch(device.index, &module(), stream)
    })?;
    Ok(y)
}

/// The `swiglu` kernel over `[gate, up, y]`: `n` elements in rows of `c`, gate's and up's rows
/// `ld` elements apart.
pub(super) fn swiglu_call(
    [pg, pu, py]: [u64; 3],
    bf16: i32,
    n: usize,
    c: usize,
    [ld_gate, ld_up]: [usize; 2],
) -> Call {
    use Arg::*;
    Call {
        name: "swiglu",
        how: Launch::grid_stride(n),
        args: vec![
            Ptr(pg),
            Ptr(pu),
            Ptr(py),
            I32(bf16),
            I64(n as i64),
            I64(c as i64),
            I64(ld_gate as i64),
            I64(ld_up as i64),
        ],
    }
}

/// The distance between rows of `t` [.., c] read as rows of c contiguous elements, where the
/// rows are evenly spaced (contiguous: c; a column view of a wider tensor: its width); None
/// otherwise.
fn row_stride(t: &CudaTensor) -> Option<usize> {
    let (shape, strides) = (t.meta.shape().as_slice(), t.meta.strides());
    let (&c, lead) = shape.split_last()?;
    if strides[lead.len()] != 1 && c > 1 {
        return None;
    }
    // The leading dims of more than one index, outermost first: (extent, stride).
    let dims: Vec<(usize, usize)> = (0..lead.len())
        .filter(|&i| lead[i] > 1)
        .map(|i| (lead[i], strides[i]))
        .collect();
    let ld = dims.last().map_or(c, |&(_, s)| s);
    let even = dims.windows(2).all(|w| w[0].1 == w[1].0 * w[1].1);
    (ld >= c && even).then_some(ld)
}

/// The backward of [`swiglu`]: (d gate, d up), each in gate's shape and dtype.
pub fn swiglu_backward(
    gate: &CudaTensor,
    up: &CudaTensor,
    dy: &CudaTensor,
) -> Result<(CudaTensor, CudaTensor), String> {
    let shape = gate.meta.shape().as_slice().to_vec();
    let ([gate, up, dy], bf16) = inputs([
        (gate, "gate", None),
        (up, "up", Some(&shape)),
        (dy, "dy", Some(&shape)),
    ])?;
    let n = shape.iter().product::<usize>();
    if n == 0 {
        return Err("empty".into());
    }
    nvrtc::ensure_loaded(&gate.device, module())?;
    let (d_gate, d_up) = (like(&gate, &shape, gate.dtype), like(&gate, &shape, gate.dtype));
    let device = gate.device.clone();
    let bindings = [&gate, &up, &dy, &d_gate, &d_up].map(|t| t.handle.clone().binding());
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [pg, pu, pdy, pdg, pdu]| {
            use Arg::*;
            let args = [
                Ptr(pg),
                Ptr(pu),
                Ptr(pdy),
                Ptr(pdg),
                Ptr(pdu),
                I32(bf16),
                I64(n as i64),
            ];
            nvrtc::launch(
                device.index,
                &module(),
                "swiglu_backward",
                Launch::grid_stride(n),
                stream,
                &args,
            )
        },
    )?;
    Ok((d_gate, d_up))
}

/// RoPE of x [B, H, T, hd] (any strides with a contiguous head dim) with tables cos, sin
/// [R, T, hd] (bf16 or f32), R = B or 1. The output is [B, T, H, hd] contiguous, for the caller to view as
/// [B, H, T, hd] (`swap_dims(1, 2)`): the layout the model's next reshape wants.
pub fn rope(x: &CudaTensor, cos: &CudaTensor, sin: &CudaTensor) -> Result<CudaTensor, String> {
    let [b, h, t, hd] = match x.meta.shape().as_slice() {
        &[b, h, t, hd] => [b, h, t, hd],
        other => return Err(format!("x: shape {other:?}")),
    };
    let bf16 = nvrtc::dtype_flag(x.dtype, "x")?;
    let (r, tab_bf16) = tables(cos, sin, [b, t, hd])?;
    let pairs = b * h * t * hd / 2;
    if hd % 2 != 0 || pairs == 0 || pairs > i32::MAX as usize {
        return Err(format!("x: shape {:?}", [b, h, t, hd]));
    }
    let x = if x.meta.strides()[3] == 1 {
        x.clone()
    } else {
        contiguous(x.clone())
    };
    let xs = x.meta.strides();
    let xs = [xs[0] as i64, xs[1] as i64, xs[2] as i64];
    let (cos, sin) = (contiguous(cos.clone()), contiguous(sin.clone()));
    nvrtc::ensure_loaded(&x.device, module())?;
    let y = like(&x, &[b, t, h, hd], x.dtype);
    let ys = [(t * h * hd) as i64, hd as i64, (h * hd) as i64];
    let device = x.device.clone();
    let bindings = [&x, &y, &cos, &sin].map(|t| t.handle.clone().binding());
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [px, py, pc, ps]| {
            use Arg::*;
            let args = [
                Ptr(px),
                Ptr(py),
                Ptr(pc),
                Ptr(ps),
                I32(bf16),
                I32(tab_bf16),
                I32(h as i32),
                I32(t as i32),
                I32((hd / 2) as i32),
                I32(i32::from(r == 1)),
                I32(pairs as i32),
                I64(xs[0]),
                I64(xs[1]),
                I64(xs[2]),
                I64(ys[0]),
                I64(ys[1]),
                I64(ys[2]),
            ];
            nvrtc::launch(
                device.index,
                &module(),
                "rope",
                Launch::grid_stride(pairs),
                stream,
                &args,
            )
        },
    )?;
    Ok(y)
}

/// RoPE's tables cos, sin [R, T, hd] for `b` rows of T positions: R = b or 1 (shared), one
/// float dtype for both. Returns (R, the tables' bf16 flag).
pub(super) fn tables(
    cos: &CudaTensor,
    sin: &CudaTensor,
    [b, t, hd]: [usize; 3],
) -> Result<(usize, i32), String> {
    let r = cos.meta.shape()[0];
    let tab_bf16 = nvrtc::dtype_flag(cos.dtype, "cos")?;
    for (table, what) in [(cos, "cos"), (sin, "sin")] {
        if table.dtype != cos.dtype || table.meta.shape().as_slice() != [r, t, hd] || (r != b && r != 1) {
            return Err(format!(
                "{what}: {:?} {:?} for {b} rows of {t} positions, head dim {hd}",
                table.dtype,
                table.meta.shape().as_slice()
            ));
        }
    }
    Ok((r, tab_bf16))
}

/// [`crate::ModelKernels::rope_qkv`] in one kernel: y [B, T, (H + 2 KV) hd] (made contiguous
/// if it is not), bias [(H + 2 KV) hd] or none, tables as [`rope`]; k and v written into
/// `k_cache`, `v_cache` [B, KV, cap, hd], which must be contiguous, of y's dtype and held
/// nowhere else (they are written in place). Returns q [B, T, H, hd] contiguous, for the
/// caller to view as [B, H, T, hd].
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    y: &CudaTensor,
    bias: Option<&CudaTensor>,
    [heads, kv_heads]: [usize; 2],
    cos: &CudaTensor,
    sin: &CudaTensor,
    k_cache: &CudaTensor,
    v_cache: &CudaTensor,
    at: usize,
) -> Result<CudaTensor, String> {
    let [b, t, n] = match y.meta.shape().as_slice() {
        &[b, t, n] => [b, t, n],
        other => return Err(format!("y: shape {other:?}")),
    };
    let all = heads + 2 * kv_heads;
    let hd = n / all.max(1);
    let bf16 = nvrtc::dtype_flag(y.dtype, "y")?;
    if all == 0 || hd * all != n || hd % 2 != 0 {
        return Err(format!("y {:?} for {heads} + 2 x {kv_heads} heads", [b, t, n]));
    }
    let (r, tab_bf16) = tables(cos, sin, [b, t, hd])?;
    if let Some(bias) = bias
        && (bias.dtype != y.dtype || bias.meta.shape().as_slice() != [n])
    {
        return Err(format!(
            "bias: {:?} {:?}",
            bias.dtype,
            bias.meta.shape().as_slice()
        ));
    }
    let cap = k_cache.meta.shape()[2];
    for (cache, what) in [(k_cache, "k cache"), (v_cache, "v cache")] {
        let shape = cache.meta.shape().as_slice();
        if cache.dtype != y.dtype || shape != [b, kv_heads, cap, hd] || at + t > cap {
            return Err(format!(
                "{what}: {:?} {shape:?} for {t} positions at {at}",
                cache.dtype
            ));
        }
        if !cache.is_contiguous() || !cache.can_mut() {
            return Err(format!("{what}: not contiguous, or held elsewhere"));
        }
    }
    let pairs = b * t * all * hd / 2;
    if pairs == 0 || pairs > i32::MAX as usize {
        return Err(format!("y: shape {:?}", [b, t, n]));
    }
    let y = contiguous(y.clone());
    let bias = bias.map(|b| contiguous(b.clone()));
    let (cos, sin) = (contiguous(cos.clone()), contiguous(sin.clone()));
    nvrtc::ensure_loaded(&y.device, module())?;
    let q = like(&y, &[b, t, heads, hd], y.dtype);
    let device = y.device.clone();
    // With no bias, y stands in its binding's place and the kernel gets a null pointer.
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| y.clone());
    let bindings = [&y, &bias, &q, k_cache, v_cache, &cos, &sin].map(|t| t.handle.clone().binding());
    let rope = RopeQkv {
        bf16,
        tab_bf16,
        heads: [heads, kv_heads],
        b,
        t,
        hd,
        shared: r == 1,
        has_bias,
        cap,
        at,
        pages: None,
    };
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        rope.call(ptrs).launch(device.index, &module(), stream)
    })?;
    Ok(q)
}

/// What the `rope_qkv` kernel takes besides its buffers.
#[derive(Clone, Copy, Debug)]
pub(super) struct RopeQkv {
    pub bf16: i32,
    /// The tables' flag (they may be f32 under bf16 activations).
    pub tab_bf16: i32,
    /// Query and K/V heads.
    pub heads: [usize; 2],
    /// Rows, and new positions per row.
    pub b: usize,
    pub t: usize,
    pub hd: usize,
    /// One row of tables for every batch row.
    pub shared: bool,
    pub has_bias: bool,
    /// The caches' positions, and where the new ones go.
    pub cap: usize,
    pub at: usize,
    /// The page table of a paged cache (the caches are then pools of slots), or None.
    pub pages: Option<Paging>,
}

impl RopeQkv {
    /// The kernel over `[y, bias, q, k_cache, v_cache, cos, sin]` (the bias pointer is not
    /// read unless `has_bias`).
    pub(super) fn call(&self, [py, pb, pq, pk, pv, pc, ps]: [u64; 7]) -> Call {
        use Arg::*;
        let [heads, kv_heads] = self.heads;
        let pairs = self.b * self.t * (heads + 2 * kv_heads) * self.hd / 2;
        Call {
            name: "rope_qkv",
            how: Launch::grid_stride(pairs),
            args: vec![
                Ptr(py),
                Ptr(if self.has_bias { pb } else { 0 }),
                Ptr(pq),
                Ptr(pk),
                Ptr(pv),
                Ptr(pc),
                Ptr(ps),
                I32(self.bf16),
                I32(self.tab_bf16),
                I32(heads as i32),
                I32(kv_heads as i32),
                I32(self.t as i32),
                I32((self.hd / 2) as i32),
                I32(i32::from(self.shared)),
                I32(pairs as i32),
                I64(self.cap as i64),
                I64(self.at as i64),
            ]
            .into_iter()
            .chain(Paging::args(self.pages))
            .collect(),
        }
    }
}
