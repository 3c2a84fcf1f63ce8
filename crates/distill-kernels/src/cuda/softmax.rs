//! Attention's softmax and its backward as two fused CUDA kernels, compiled at run time with
//! NVRTC (which cubecl already loads) and issued on cubecl's stream like the cuBLAS GEMMs
//! ([`stream::run_on_stream`]).
//!
//! Why: between the Q Kᵀ and P V GEMMs the blockwise attention ([`super::attention`]) ran the
//! softmax as burn ops, each one a kernel and a full pass over the f32 [r, h, T, S] scores:
//! scale, mask, max, subtract, exp, sum, divide, cast (and about as many in the backward). Each
//! pass moves 2-3x the bytes of the scores; the H100 profile of a 0.5B full fine-tuning step
//! put this elementwise work at about half of the GPU time. Here the forward reads the scores
//! and the mask once (twice from L2) and writes P and the log-sum-exp; the backward reads the
//! scores, dP and the mask once and writes dS and P.
//!
//! Numerics are the burn-op path's ([`super::attention::probs_default`]): masked scores are
//! -1e30, P = exp(s - lse) with lse = max + ln(sum exp(s - max)), all in f32, rounded once
//! to the output dtype (bf16 round-to-nearest-even, or f32).
//!
//! Inputs the kernels do not take (another dtype, a mask stored as u32, a rank other than 4)
//! get `Err` and the caller falls back to the burn ops; `DISTILL_SOFTMAX=burn` does so always.

use std::sync::OnceLock;

use super::contiguous;
use burn::tensor::{BoolStore, DType};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::server::Binding;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::sys as cu;

use super::nvrtc::{self, Arg};
use super::stream;

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
/* Offset of (row, key 0) in a [r, h, T, S] mask with strides m0..m2 (elements). */
__device__ __forceinline__ i64 mask_row(i64 row, int h, int t, i64 m0, i64 m1, i64 m2) {
    i64 b = row / ((i64)h * t), hh = (row / t) % h, q = row % t;
    return b * m0 + hh * m1 + q * m2;
}

/* (m, l) <- the running max and the sum of exp(x - m) over both halves. */
__device__ __forceinline__ void combine(float& m, float& l, float m2, float l2) {
    float mx = fmaxf(m, m2);
    if (mx == __int_as_float(0xff800000)) { m = mx; l = 0.f; return; }
    l = l * expf(m - mx) + l2 * expf(m2 - mx);
    m = mx;
}

/* One block per query row of the [r, h, T, S] scores. */
extern "C" __global__ void attention_probs(
    const float* scores, const unsigned char* mask, i64 m0, i64 m1, i64 m2, i64 m3,
    int h, int t, int s, float scale, void* p, int p_bf16, float* lse)
{
    const i64 row = blockIdx.x;
    const float* x = scores + row * (i64)s;
    const unsigned char* mrow = mask ? mask + mask_row(row, h, t, m0, m1, m2) : 0;
    float m = __int_as_float(0xff800000), l = 0.f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
        float v = (mrow && mrow[j * m3]) ? -1e30f : x[j] * scale;
        if (v > m) { l = l * expf(m - v) + 1.f; m = v; } else { l += expf(v - m); }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2v = __shfl_xor_sync(0xffffffffu, m, off);
        float l2v = __shfl_xor_sync(0xffffffffu, l, off);
        combine(m, l, m2v, l2v);
    }
    __shared__ float sm[32], sl[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? sm[lane] : __int_as_float(0xff800000);
        l = lane < warps ? sl[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) {
            float m2v = __shfl_xor_sync(0xffffffffu, m, off);
            float l2v = __shfl_xor_sync(0xffffffffu, l, off);
            combine(m, l, m2v, l2v);
        }
        if (lane == 0) { sm[0] = m; sl[0] = l; }
    }
    __syncthreads();
    const float total = sm[0] + logf(sl[0]);
    if (threadIdx.x == 0) lse[row] = total;
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
        float v = (mrow && mrow[j * m3]) ? -1e30f : x[j] * scale;
        store(p, p_bf16, row * (i64)s + j, expf(v - total));
    }
}

/* Elementwise over [r, h, T, S]: P = exp(scale * s - lse), dS = P (dP - delta) scale. */
extern "C" __global__ void attention_probs_grad(
    const float* scores, const float* dp, const float* lse, const float* delta,
    const unsigned char* mask, i64 m0, i64 m1, i64 m2, i64 m3,
    int h, int t, int s, float scale, void* ds, int ds_bf16, void* p, int p_bf16, i64 n)
{
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 row = i / s, j = i - row * s;
        const bool masked = mask && mask[mask_row(row, h, t, m0, m1, m2) + j * m3];
        const float v = masked ? -1e30f : scores[i] * scale;
        const float pv = expf(v - lse[row]);
        store(ds, ds_bf16, i, pv * (dp[i] - delta[row]) * scale);
        store(p, p_bf16, i, pv);
    }
}
"#;

/// Whether the fused kernels are on: `DISTILL_SOFTMAX=burn` turns them off (for comparison).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| match std::env::var("DISTILL_SOFTMAX").as_deref() {
        Err(_) | Ok("") | Ok("fused") => true,
        Ok("burn") => false,
        Ok(other) => {
            eprintln!("warning: DISTILL_SOFTMAX={other:?} is not one of fused, burn; using fused");
            true
        }
    })
}

/// The two kernels, NVRTC's default architecture.
fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "attention_probs".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["attention_probs", "attention_probs_grad"],
        dynamic_smem: 0,
    }
}

/// Launches kernel `name` of [`module`] with blocks of 256 threads.
fn run(device: usize, name: &str, blocks: u32, stream: cu::CUstream, args: &[Arg]) -> Result<(), String> {
    let how = nvrtc::Launch {
        grid: (blocks, 1, 1),
        threads: 256,
        dynamic_smem: 0,
    };
    nvrtc::launch(device, &module(), name, how, stream, args)
}

/// The parameters both kernels share, in their order: the mask (a u8 [r, h, T, S] buffer and
/// its four strides, or a null pointer, the binding then being some other live buffer's,
/// unused), the block's h, T and S (a flat row index -> (row, head, query)), and the scale.
struct Geometry {
    mask: Option<CudaTensor>,
    strides: [i64; 4],
    dims: [i32; 3],
    scale: f32,
}

impl Geometry {
    /// dims: the scores' [r, h, T, S].
    fn new(mask: Option<&CudaTensor>, dims: &[usize], scale: f32) -> Result<Self, String> {
        let fit = |x: usize| i32::try_from(x).map_err(|_| format!("{x} does not fit a kernel's int"));
        let (mask, strides) = match mask {
            None => (None, [0; 4]),
            Some(m) => {
                if m.dtype != DType::Bool(BoolStore::U8) || m.meta.shape().as_slice() != dims {
                    return Err(format!("mask {:?} {:?}", m.dtype, m.meta.shape()));
                }
                let st = m.meta.strides();
                (Some(m.clone()), [st[0], st[1], st[2], st[3]].map(|x| x as i64))
            }
        };
        Ok(Geometry {
            mask,
            strides,
            dims: [fit(dims[1])?, fit(dims[2])?, fit(dims[3])?],
            scale,
        })
    }

    fn mask_binding(&self, otherwise: &CudaTensor) -> Binding {
        self.mask.as_ref().unwrap_or(otherwise).handle.clone().binding()
    }

    /// The nine shared parameters, given the mask binding's device pointer.
    fn args(&self, mask_ptr: u64) -> [Arg; 9] {
        let [m0, m1, m2, m3] = self.strides;
        let [h, t, s] = self.dims;
        let ptr = if self.mask.is_some() { mask_ptr } else { 0 };
        use Arg::*;
        [
            Ptr(ptr),
            I64(m0),
            I64(m1),
            I64(m2),
            I64(m3),
            I32(h),
            I32(t),
            I32(s),
            F32(self.scale),
        ]
    }
}

/// An f32 rank-4 tensor, made contiguous.
fn f32_input(t: &CudaTensor, what: &str) -> Result<CudaTensor, String> {
    if t.dtype != DType::F32 || t.meta.rank() != 4 {
        return Err(format!("{what}: {:?} rank {}", t.dtype, t.meta.rank()));
    }
    Ok(contiguous(t.clone()))
}

/// P = softmax(scale * scores, masked) in `p_dtype` and lse [r, h, T, 1] (f32).
/// scores: [r, h, T, S] f32; mask: [r, h, T, S] bool, true = masked out.
pub fn probs(
    scores: &CudaTensor,
    mask: Option<&CudaTensor>,
    scale: f32,
    p_dtype: DType,
) -> Result<(CudaTensor, CudaTensor), String> {
    let scores = f32_input(scores, "scores")?;
    let dims = scores.meta.shape().as_slice().to_vec();
    let (r, h, t, s) = (dims[0], dims[1], dims[2], dims[3]);
    let geometry = Geometry::new(mask, &dims, scale)?;
    nvrtc::ensure_loaded(&scores.device, module())?;
    let p_bf16 = nvrtc::dtype_flag(p_dtype, "P")?;
    let rows = r * h * t;
    let grid = u32::try_from(rows).map_err(|_| format!("{rows} rows"))?;
    if rows == 0 || s == 0 {
        return Err("empty".into());
    }
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let p = empty_device_contiguous_dtype(client.clone(), device.clone(), dims.clone().into(), p_dtype);
    let lse = empty_device_contiguous_dtype(client, device.clone(), vec![r, h, t, 1].into(), DType::F32);
    let bindings = [
        scores.handle.clone().binding(),
        p.handle.clone().binding(),
        lse.handle.clone().binding(),
        geometry.mask_binding(&scores),
    ];
    let index = device.index;
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [x, pp, l, mk]| {
            use Arg::*;
            let mut args = vec![Ptr(x)];
            args.extend(geometry.args(mk));
            args.extend([Ptr(pp), I32(p_bf16), Ptr(l)]);
            run(index, "attention_probs", grid, stream, &args)
        },
    )?;
    Ok((p, lse))
}

/// The backward of [`probs`]: dS = P ∘ (dP - delta) · scale in `ds_dtype` and P in `p_dtype`,
/// P recomputed from the scores and lse. scores, dp: [r, h, T, S] f32; lse, delta:
/// [r, h, T, 1] f32; mask as in [`probs`].
#[allow(clippy::too_many_arguments)]
pub fn probs_grad(
    scores: &CudaTensor,
    dp: &CudaTensor,
    lse: &CudaTensor,
    delta: &CudaTensor,
    mask: Option<&CudaTensor>,
    scale: f32,
    ds_dtype: DType,
    p_dtype: DType,
) -> Result<(CudaTensor, CudaTensor), String> {
    let scores = f32_input(scores, "scores")?;
    let dp = f32_input(dp, "dP")?;
    let lse = f32_input(lse, "lse")?;
    let delta = f32_input(delta, "delta")?;
    let dims = scores.meta.shape().as_slice().to_vec();
    let (r, h, t, s) = (dims[0], dims[1], dims[2], dims[3]);
    let row_dims = vec![r, h, t, 1];
    if dp.meta.shape().as_slice() != dims
        || lse.meta.shape().as_slice() != row_dims
        || delta.meta.shape().as_slice() != row_dims
    {
        return Err("shapes".into());
    }
    let geometry = Geometry::new(mask, &dims, scale)?;
    nvrtc::ensure_loaded(&scores.device, module())?;
    let (ds_bf16, p_bf16) = (
        nvrtc::dtype_flag(ds_dtype, "dS")?,
        nvrtc::dtype_flag(p_dtype, "P")?,
    );
    let n = (r * h * t * s) as i64;
    if n == 0 {
        return Err("empty".into());
    }
    let blocks = ((n + 255) / 256).min(1 << 20) as u32;
    let (client, device) = (scores.client.clone(), scores.device.clone());
    let ds = empty_device_contiguous_dtype(client.clone(), device.clone(), dims.clone().into(), ds_dtype);
    let p = empty_device_contiguous_dtype(client, device.clone(), dims.into(), p_dtype);
    let bindings = [
        scores.handle.clone().binding(),
        dp.handle.clone().binding(),
        lse.handle.clone().binding(),
        delta.handle.clone().binding(),
        ds.handle.clone().binding(),
        p.handle.clone().binding(),
        geometry.mask_binding(&scores),
    ];
    let index = device.index;
    stream::run_on_stream(
        &device,
        bindings,
        nvrtc::ordering(),
        move |stream, [x, d, l, dl, o_ds, o_p, mk]| {
            use Arg::*;
            let mut args = vec![Ptr(x), Ptr(d), Ptr(l), Ptr(dl)];
            args.extend(geometry.args(mk));
            args.extend([Ptr(o_ds), I32(ds_bf16), Ptr(o_p), I32(p_bf16), I64(n)]);
            run(index, "attention_probs_grad", blocks, stream, &args)
        },
    )?;
    Ok((ds, p))
}
