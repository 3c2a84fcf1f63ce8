//! The loss's two passes over LM-head logits ([`super::logits`]) as CUDA kernels: one reads
//! each row once for its max and exp-sums, the other writes the gradient once in the GEMM's
//! dtype, and a third adds the few sparse terms (teacher ids, label) per row before rounding.
//!
//! Why: as burn ops the closed-form loss made about ten passes over each f32 [1024, 151936]
//! chunk (cast, max, subtract, exp, sum, scale, two scatters, cast back): about 40 ms of a
//! 0.5B step's 50 ms loss phase on the H100.

use super::contiguous;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::nvrtc::{self, Arg, Launch};
use super::stream;

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

/* (m, s, st) <- the running max and the exp-sums at temperatures 1 and t over both parts. */
__device__ __forceinline__ void combine(float& m, float& s, float& st, float m2, float s2, float st2, float inv_t) {
    const float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;
    const float a = m - mx, b = m2 - mx;
    s = s * expf(a) + s2 * expf(b);
    st = st * expf(a * inv_t) + st2 * expf(b * inv_t);
    m = mx;
}

/* One block per row: max, sum exp(z - max), sum exp((z - max) / t) over columns < limit. */
extern "C" __global__ void softmax_stats(const void* z, int z_bf16, int v, int limit, float inv_t,
                                         float* max_out, float* sum_out, float* sum_t_out)
{
    const i64 row = blockIdx.x;
    float m = NEG_INF, s = 0.f, st = 0.f;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) {
        const float x = load(z, z_bf16, row * v + j);
        if (x > m) {
            const float a = m - x;
            s = s * expf(a) + 1.f;
            st = st * expf(a * inv_t) + 1.f;
            m = x;
        } else {
            s += expf(x - m);
            st += expf((x - m) * inv_t);
        }
    }
    for (int off = 16; off > 0; off >>= 1)
        combine(m, s, st, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off),
                __shfl_xor_sync(0xffffffffu, st, off), inv_t);
    __shared__ float sm[32], ss[32], sst[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; sst[warp] = st; }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? sm[lane] : NEG_INF;
        s = lane < warps ? ss[lane] : 0.f;
        st = lane < warps ? sst[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1)
            combine(m, s, st, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off),
                    __shfl_xor_sync(0xffffffffu, st, off), inv_t);
        if (lane == 0) { max_out[row] = m; sum_out[row] = s; sum_t_out[row] = st; }
    }
}

/* The dense gradient at (row, j): a e + b e_t below the limit, 0 past it. */
__device__ __forceinline__ float dense(const void* z, int z_bf16, int v, int limit, i64 row, int j,
                                      const float* mx, const float* a, const float* b, float inv_t) {
    if (j >= limit) return 0.f;
    const float x = load(z, z_bf16, row * v + j) - mx[row];
    float g = a[row] * expf(x);
    if (b) g += b[row] * expf(x * inv_t);
    return g;
}

/* Row blockIdx.x, columns blockIdx.y * GRAD_COLS onwards: a 2-D grid, so no 64-bit division
 * per element (a flat index's i / v halved the kernel's bandwidth). */
#define GRAD_COLS 2048
extern "C" __global__ void softmax_grad(const void* z, int z_bf16, int v, int limit,
                                        const float* mx, const float* a, const float* b, float inv_t,
                                        void* out, int out_bf16)
{
    const i64 row = blockIdx.x;
    const int end = min(v, (int)(blockIdx.y + 1) * GRAD_COLS);
    for (int j = blockIdx.y * GRAD_COLS + threadIdx.x; j < end; j += blockDim.x)
        store(out, out_bf16, row * v + j, dense(z, z_bf16, v, limit, row, j, mx, a, b, inv_t));
}

/* One thread per row: each distinct column among ids[row, :] gets dense + the sum of its
 * values, rounded once (after softmax_grad on the same stream). */
extern "C" __global__ void softmax_grad_sparse(const void* z, int z_bf16, int v, int limit,
                                               const float* mx, const float* a, const float* b, float inv_t,
                                               const int* ids, const float* values, int m_len,
                                               void* out, int out_bf16, int rows)
{
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const int* id = ids + (i64)row * m_len;
    const float* val = values + (i64)row * m_len;
    for (int m = 0; m < m_len; m++) {
        const int col = id[m];
        if (col < 0 || col >= v) continue;
        bool seen = false;
        for (int e = 0; e < m; e++) seen |= id[e] == col;
        if (seen) continue;
        float add = 0.f;
        for (int e = m; e < m_len; e++) if (id[e] == col) add += val[e];
        store(out, out_bf16, (i64)row * v + col, dense(z, z_bf16, v, limit, row, col, mx, a, b, inv_t) + add);
    }
}
"#;

/// Columns per block of `softmax_grad` (its `GRAD_COLS`).
const GRAD_COLS: usize = 2048;

fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "logits".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["softmax_stats", "softmax_grad", "softmax_grad_sparse"],
        dynamic_smem: 0,
    }
}

/// Logits [N, V] (bf16 or f32), made contiguous, with N, V and the bf16 flag.
fn logits(z: &CudaTensor) -> Result<(CudaTensor, usize, usize, i32), String> {
    let bf16 = nvrtc::dtype_flag(z.dtype, "logits")?;
    let s = z.meta.shape();
    if z.meta.rank() != 2 || s[0] == 0 || s[1] == 0 || s[0] > i32::MAX as usize || s[1] > i32::MAX as usize {
        return Err(format!("logits {:?}", s.as_slice()));
    }
    Ok((contiguous(z.clone()), s[0], s[1], bf16))
}

/// An f32 [N, 1] row vector, contiguous.
fn rows(x: &CudaTensor, n: usize, what: &str) -> Result<CudaTensor, String> {
    if x.dtype != DType::F32 || x.meta.shape().as_slice() != [n, 1] {
        return Err(format!("{what}: {:?} {:?}", x.dtype, x.meta.shape().as_slice()));
    }
    Ok(contiguous(x.clone()))
}

fn vector(like: &CudaTensor, n: usize) -> CudaTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        vec![n, 1].into(),
        DType::F32,
    )
}

/// (max, Σ exp(z - max), Σ exp((z - max) / t)) per row over columns < limit, [N, 1] f32.
pub fn stats(z: &CudaTensor, t: f32, limit: usize) -> Result<(CudaTensor, CudaTensor, CudaTensor), String> {
    let (z, n, v, z_bf16) = logits(z)?;
    let limit = limit.min(v);
    if limit == 0 || n > u32::MAX as usize {
        return Err("empty".into());
    }
    nvrtc::ensure_loaded(&z.device, module())?;
    let (mx, sum, sum_t) = (vector(&z, n), vector(&z, n), vector(&z, n));
    let bindings = [&z, &mx, &sum, &sum_t].map(|x| x.handle.clone().binding());
    let device = z.device.clone();
    let how = Launch {
        grid: (n as u32, 1, 1),
        threads: 512,
        dynamic_smem: 0,
    };
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [pz, pm, ps, pst]| {
            use Arg::*;
            let args = [
                Ptr(pz),
                I32(z_bf16),
                I32(v as i32),
                I32(limit as i32),
                F32(1.0 / t),
                Ptr(pm),
                Ptr(ps),
                Ptr(pst),
            ];
            nvrtc::launch(device.index, &module(), "softmax_stats", how, stream, &args)
        },
    )?;
    Ok((mx, sum, sum_t))
}

/// The gradient of [`crate::TrainKernels::softmax_grad`] in `dtype` (bf16 or f32).
#[allow(clippy::too_many_arguments)]
pub fn grad(
    z: &CudaTensor,
    max: &CudaTensor,
    a: &CudaTensor,
    b: Option<&CudaTensor>,
    t: f32,
    limit: usize,
    ids: &CudaTensor,
    values: &CudaTensor,
    dtype: DType,
) -> Result<CudaTensor, String> {
    let (z, n, v, z_bf16) = logits(z)?;
    let out_bf16 = nvrtc::dtype_flag(dtype, "the gradient's dtype")?;
    let (max, a) = (rows(max, n, "max")?, rows(a, n, "a")?);
    let b = b.map(|b| rows(b, n, "b")).transpose()?;
    let m_len = ids.meta.shape()[1];
    if ids.dtype != DType::I32 || ids.meta.shape().as_slice() != [n, m_len] {
        return Err(format!("ids: {:?} {:?}", ids.dtype, ids.meta.shape().as_slice()));
    }
    if values.dtype != DType::F32 || values.meta.shape().as_slice() != [n, m_len] {
        return Err(format!(
            "values: {:?} {:?}",
            values.dtype,
            values.meta.shape().as_slice()
        ));
    }
    let (ids, values) = (contiguous(ids.clone()), contiguous(values.clone()));
    nvrtc::ensure_loaded(&z.device, module())?;
    let out = empty_device_contiguous_dtype(z.client.clone(), z.device.clone(), vec![n, v].into(), dtype);
    let has_b = b.is_some();
    let bindings =
        [&z, &max, &a, b.as_ref().unwrap_or(&a), &ids, &values, &out].map(|x| x.handle.clone().binding());
    let device = z.device.clone();
    let limit = limit.min(v);
    let dense_launch = Launch {
        grid: (n as u32, v.div_ceil(GRAD_COLS) as u32, 1),
        threads: 256,
        dynamic_smem: 0,
    };
    let sparse_launch = Launch {
        grid: (n.div_ceil(128) as u32, 1, 1),
        threads: 128,
        dynamic_smem: 0,
    };
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [pz, pm, pa, pb, pids, pvals, pout]| {
            use Arg::*;
            let pb = if has_b { pb } else { 0 };
            let head = [
                Ptr(pz),
                I32(z_bf16),
                I32(v as i32),
                I32(limit as i32),
                Ptr(pm),
                Ptr(pa),
                Ptr(pb),
                F32(1.0 / t),
            ];
            let mut args = head.to_vec();
            args.extend([Ptr(pout), I32(out_bf16)]);
            nvrtc::launch(
                device.index,
                &module(),
                "softmax_grad",
                dense_launch,
                stream,
                &args,
            )?;
            let mut args = head.to_vec();
            args.extend([
                Ptr(pids),
                Ptr(pvals),
                I32(m_len as i32),
                Ptr(pout),
                I32(out_bf16),
                I32(n as i32),
            ]);
            nvrtc::launch(
                device.index,
                &module(),
                "softmax_grad_sparse",
                sparse_launch,
                stream,
                &args,
            )
        },
    )?;
    Ok(out)
}
