//! NF4 dequantization as one CUDA kernel ([`crate::ModelKernels::nf4_dequantize`]): a thread per
//! packed word, eight values out. As burn ops it is a shift, a mask, a gather and a multiply,
//! each a pass over the full-size weight, run three times a step for every linear layer of a
//! QLoRA model (forward, recomputed forward, backward).

use super::contiguous;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

use super::nvrtc::{self, Arg, Launch};
use super::stream;
use crate::nf4::CODEBOOK;

type CudaTensor = CubeTensor<CudaRuntime>;

const SOURCE: &str = r#"
/* Word w holds elements 8w .. 8w+7: byte j (little-endian) has element 8w+2j in its high
   nibble and 8w+2j+1 in its low one. absmax has one scale per 64 elements (8 words). Codes
   are i32, or i64 holding the same 32 bits (codes64). Writes the first n elements. */
extern "C" __global__ void nf4_dequantize(
    const void* codes, int codes64, const float* absmax, void* out, int bf16, i64 n,
    float l0, float l1, float l2, float l3, float l4, float l5, float l6, float l7,
    float l8, float l9, float l10, float l11, float l12, float l13, float l14, float l15)
{
    const float levels[16] = {l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15};
    const i64 words = (n + 7) / 8;
    for (i64 w = blockIdx.x * (i64)blockDim.x + threadIdx.x; w < words; w += (i64)gridDim.x * blockDim.x) {
        const unsigned int word = codes64 ? (unsigned int)((const long long*)codes)[w]
                                          : ((const unsigned int*)codes)[w];
        const float scale = absmax[w >> 3];
        float v[8];
        for (int k = 0; k < 8; ++k) {
            const unsigned int byte = (word >> (8 * (k >> 1))) & 0xffu;
            v[k] = levels[(k & 1) ? (byte & 15u) : (byte >> 4)] * scale;
        }
        const i64 base = w * 8;
        if (bf16 && base + 8 <= n) {
            uint4 packed;
            packed.x = (unsigned int)to_bf16(v[0]) | ((unsigned int)to_bf16(v[1]) << 16);
            packed.y = (unsigned int)to_bf16(v[2]) | ((unsigned int)to_bf16(v[3]) << 16);
            packed.z = (unsigned int)to_bf16(v[4]) | ((unsigned int)to_bf16(v[5]) << 16);
            packed.w = (unsigned int)to_bf16(v[6]) | ((unsigned int)to_bf16(v[7]) << 16);
            ((uint4*)out)[w] = packed;
        } else {
            for (int k = 0; k < 8 && base + k < n; ++k) store(out, bf16, base + k, v[k]);
        }
    }
}
"#;

fn module() -> nvrtc::Module {
    nvrtc::Module {
        key: "nf4".into(),
        sources: &[nvrtc::BF16_STORE, SOURCE],
        arch: None,
        options: Vec::new(),
        names: &["nf4_dequantize"],
        dynamic_smem: 0,
    }
}

/// The weight [out, in] in `dtype` (bf16 or f32) from its codes (i32 or i64 [blocks * 8]) and
/// scales (f32 [blocks]).
pub fn dequantize(
    codes: &CudaTensor,
    absmax: &CudaTensor,
    shape: [usize; 2],
    dtype: DType,
) -> Result<CudaTensor, String> {
    let n = shape[0] * shape[1];
    let codes64 = match codes.dtype {
        DType::I32 | DType::U32 => 0,
        DType::I64 | DType::U64 => 1,
        other => return Err(format!("NF4 codes are {other:?}")),
    };
    let words = codes.meta.shape()[0];
    let blocks = absmax.meta.shape()[0];
    if absmax.dtype != DType::F32 || words * 8 < n || blocks * crate::nf4::BLOCK < n {
        return Err(format!(
            "NF4 scales {:?} [{blocks}] for codes [{words}] of a {shape:?} weight",
            absmax.dtype
        ));
    }
    let bf16 = nvrtc::dtype_flag(dtype, "the dequantized weight")?;
    if n == 0 {
        return Err("an empty weight".into());
    }
    nvrtc::ensure_loaded(&codes.device, module())?;
    let (codes, absmax) = (contiguous(codes.clone()), contiguous(absmax.clone()));
    let out = empty_device_contiguous_dtype(
        codes.client.clone(),
        codes.device.clone(),
        shape.to_vec().into(),
        dtype,
    );
    let bindings = [&codes, &absmax, &out].map(|t| t.handle.clone().binding());
    let how = Launch::grid_stride(n.div_ceil(8));
    let device = codes.device.clone();
    stream::run_on_stream(&device, bindings, nvrtc::ordering(), move |stream, ptrs| {
        let mut args = vec![
            Arg::Ptr(ptrs[0]),
            Arg::I32(codes64),
            Arg::Ptr(ptrs[1]),
            Arg::Ptr(ptrs[2]),
            Arg::I32(bf16),
            Arg::I64(n as i64),
        ];
        args.extend(CODEBOOK.map(Arg::F32));
        nvrtc::launch(device.index, &module(), "nf4_dequantize", how, stream, &args)
    })?;
    Ok(out)
}
