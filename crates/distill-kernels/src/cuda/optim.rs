//! The AdamW update of one flat f32 group as a single CUDA kernel ([`crate::TrainKernels::adamw`]),
//! the flat group's assembly from its parameters ([`crate::TrainKernels::concat_f32`]) and its sum
//! of squares for the global gradient norm ([`crate::TrainKernels::sum_squares`]).
//!
//! Why: as burn ops the update is about ten kernels, each a full pass over the group's f32
//! tensors (scale, square, add, sqrt, divide, ...): at 0.5B parameters the optimizer phase
//! took about 31 ms of a 314 ms step on the H100. One pass reads p, g, m and v once and
//! writes p, m and v once. burn's `cat` launches a kernel per part: four groups' worth of
//! parts (gradients, values, both moments) was about 1,200 launches a step at 0.5B, and 336
//! parts each for LoRA, whose optimizer phase was host-bound at 17 ms.

use super::contiguous;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::AdamWScalars;
use super::nvrtc::{self, Arg, Launch};
use super::stream;
use std::ffi::c_void;

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
extern "C" __global__ void adamw(
    const float* p, const float* g, const float* m, const float* v,
    float* p_out, float* m_out, float* v_out, long long n,
    float beta1, float a1, float beta2, float a2, float decay, float step, float eps)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + a1 * gi;
        const float vi = beta2 * v[i] + a2 * gi * gi;
        p_out[i] = decay * p[i] - step * (mi / (sqrtf(vi) + eps));
        m_out[i] = mi;
        v_out[i] = vi;
    }
}

/* The sum of a 256-thread block's values, in thread 0, in a fixed order. */
__device__ float block_sum(float acc)
{
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    __shared__ float warps[8];
    if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = acc;
    __syncthreads();
    float sum = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < 8; ++w) sum += warps[w];
    return sum;
}

/* Per-block sums of x[i]^2 over a grid-stride loop, into partial[blockIdx.x]; 256 threads. */
extern "C" __global__ void sum_squares(const float* x, long long n, float* partial)
{
    float acc = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        acc += v * v;
    }
    const float sum = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

/* The partials' total in one block of 256 threads. With sum_squares: fixed blocks summed in a
   fixed order, so the same input gives the same bits (burn's sum picks its strategy by
   autotune, whose choice can change the order between calls). */
extern "C" __global__ void sum_partials(const float* partial, int n, float* total)
{
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    const float sum = block_sum(acc);
    if (threadIdx.x == 0) total[0] = sum;
}

#define PARTS 32
struct Parts {
    const void* src[PARTS];
    i64 offset[PARTS];
    i64 len[PARTS];
    int bf16[PARTS];
    int count;
};

/* Part blockIdx.y, cast to f32, into out at its offset. */
extern "C" __global__ void concat_f32(Parts parts, float* out)
{
    const int k = blockIdx.y;
    if (k >= parts.count) return;
    const i64 n = parts.len[k];
    float* dst = out + parts.offset[k];
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        dst[i] = load(parts.src[k], parts.bf16[k], i);
}
"#;

/// Parts per launch of `concat_f32` (its `PARTS`): the struct stays under the 4 KiB of
/// kernel arguments.
const PARTS: usize = 32;

/// The kernel's `Parts`, field for field.
#[repr(C)]
struct Parts {
    src: [u64; PARTS],
    offset: [i64; PARTS],
    len: [i64; PARTS],
    bf16: [i32; PARTS],
    count: i32,
}

fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "adamw".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["adamw", "concat_f32", "sum_squares", "sum_partials"],
        dynamic_smem: 0,
    }
}

/// Checks AdamW's inputs (f32 [N], one N) and loads its kernel: an Err is the reason to
/// fall back to burn ops, before the tensors are handed to [`adamw`].
pub fn adamw_ready(p: &CudaTensor, g: &CudaTensor, m: &CudaTensor, v: &CudaTensor) -> Result<(), String> {
    let n = p.meta.shape()[0];
    for (t, what) in [(p, "p"), (g, "g"), (m, "m"), (v, "v")] {
        if t.dtype != DType::F32 || t.meta.rank() != 1 || t.meta.shape()[0] != n {
            return Err(format!("{what}: {:?} {:?}", t.dtype, t.meta.shape()));
        }
    }
    if n == 0 {
        return Err("empty".into());
    }
    nvrtc::ensure_loaded(&p.device, module())
}

/// The updated (p, m, v), f32 [N]; inputs checked by [`adamw_ready`]. Each of p, m, v is
/// updated in place when nothing else holds its buffer (the optimizer's flat groups), so a
/// step needs no second copy of the parameters and moments; else into a new tensor.
pub fn adamw(
    p: CudaTensor,
    g: CudaTensor,
    m: CudaTensor,
    v: CudaTensor,
    c: AdamWScalars,
) -> Result<(CudaTensor, CudaTensor, CudaTensor), String> {
    let n = p.meta.shape()[0];
    let (p, g, m, v) = (contiguous(p), contiguous(g), contiguous(m), contiguous(v));
    // The kernel reads element i of each input before it writes element i of the output, in
    // one thread: an output may alias its input.
    let output = |t: &CudaTensor| {
        if t.can_mut() && t.is_contiguous_buffer() {
            t.clone()
        } else {
            empty_device_contiguous_dtype(t.client.clone(), t.device.clone(), vec![n].into(), DType::F32)
        }
    };
    let (p_out, m_out, v_out) = (output(&p), output(&m), output(&v));
    let bindings = [&p, &g, &m, &v, &p_out, &m_out, &v_out].map(|t| t.handle.clone().binding());
    let how = Launch::grid_stride(n);
    let device = p.device.clone();
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        let mut args: Vec<Arg> = ptrs.iter().map(|&x| Arg::Ptr(x)).collect();
        args.push(Arg::I64(n as i64));
        args.extend([c.beta1, c.a1, c.beta2, c.a2, c.decay, c.step, c.eps].map(Arg::F32));
        nvrtc::launch(device.index, &module(), "adamw", how, stream, &args)
    })?;
    Ok((p_out, m_out, v_out))
}

/// The parts (rank 1, bf16 or f32) cast to f32 and laid end to end, [Σ n_i].
pub fn concat_f32(parts: &[CudaTensor]) -> Result<CudaTensor, String> {
    let first = parts.first().ok_or("no parts")?;
    let mut flags = Vec::with_capacity(parts.len());
    for (i, t) in parts.iter().enumerate() {
        if t.meta.rank() != 1 {
            return Err(format!("part {i}: shape {:?}", t.meta.shape().as_slice()));
        }
        flags.push(nvrtc::dtype_flag(t.dtype, "a part")?);
    }
    let parts: Vec<CudaTensor> = parts.iter().map(|t| contiguous(t.clone())).collect();
    let lens: Vec<usize> = parts.iter().map(|t| t.meta.shape()[0]).collect();
    let total: usize = lens.iter().sum();
    nvrtc::ensure_loaded(&first.device, module())?;
    let out = empty_device_contiguous_dtype(
        first.client.clone(),
        first.device.clone(),
        vec![total].into(),
        DType::F32,
    );
    let mut at = 0;
    for (tensors, (lens, flags)) in parts
        .chunks(PARTS)
        .zip(lens.chunks(PARTS).zip(flags.chunks(PARTS)))
    {
        let mut table = Parts {
            src: [0; PARTS],
            offset: [0; PARTS],
            len: [0; PARTS],
            bf16: [0; PARTS],
            count: tensors.len() as i32,
        };
        for (k, (&n, &flag)) in lens.iter().zip(flags).enumerate() {
            table.offset[k] = at as i64;
            table.len[k] = n as i64;
            table.bf16[k] = flag;
            at += n;
        }
        // Unused slots bind `out` again: the binding list has a fixed length.
        let bindings: [_; PARTS + 1] = std::array::from_fn(|k| match tensors.get(k) {
            Some(t) => t.handle.clone().binding(),
            _ => out.handle.clone().binding(),
        });
        let longest = lens.iter().copied().max().unwrap_or(0);
        let how = Launch {
            grid: (
                longest.div_ceil(256).clamp(1, 2048) as u32,
                tensors.len() as u32,
                1,
            ),
            threads: 256,
            dynamic_smem: 0,
        };
        let device = first.device.clone();
        stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
            let count = table.count as usize;
            table.src[..count].copy_from_slice(&ptrs[..count]);
            let args = [
                Arg::Struct((&table as *const Parts).cast::<c_void>()),
                Arg::Ptr(ptrs[PARTS]),
            ];
            nvrtc::launch(device.index, &module(), "concat_f32", how, stream, &args)
        })?;
    }
    Ok(out)
}

/// Blocks of `sum_squares`: enough to keep the H100's 132 SMs streaming, few enough that one
/// block adds up their partial sums.
const SUM_BLOCKS: usize = 1024;

/// Σ x² of an f32 [N] tensor as f32 [1]: per-block partial sums, then their total in one
/// block, where square-then-sum reads x twice and writes it once.
pub fn sum_squares(x: &CudaTensor) -> Result<CudaTensor, String> {
    if x.dtype != DType::F32 || x.meta.rank() != 1 {
        return Err(format!(
            "sum of squares of {:?} {:?}",
            x.dtype,
            x.meta.shape().as_slice()
        ));
    }
    let n = x.meta.shape()[0];
    if n == 0 {
        return Err("sum of squares of an empty tensor".into());
    }
    nvrtc::ensure_loaded(&x.device, module())?;
    let x = contiguous(x.clone());
    let blocks = n.div_ceil(256).min(SUM_BLOCKS);
    let f32_buffer = |len: usize| {
        empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), vec![len].into(), DType::F32)
    };
    let (partial, total) = (f32_buffer(blocks), f32_buffer(1));
    let bindings = [&x, &partial, &total].map(|t| t.handle.clone().binding());
    let grid = |blocks: usize| Launch {
        grid: (blocks as u32, 1, 1),
        threads: 256,
        dynamic_smem: 0,
    };
    let device = x.device.clone();
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        let squares = [Arg::Ptr(ptrs[0]), Arg::I64(n as i64), Arg::Ptr(ptrs[1])];
        nvrtc::launch(
            device.index,
            &module(),
            "sum_squares",
            grid(blocks),
            stream,
            &squares,
        )?;
        let partials = [Arg::Ptr(ptrs[1]), Arg::I32(blocks as i32), Arg::Ptr(ptrs[2])];
        nvrtc::launch(
            device.index,
            &module(),
            "sum_partials",
            grid(1),
            stream,
            &partials,
        )
    })?;
    Ok(total)
}
