//! Moving small tensors between the host and the device, with errors instead of panics:
//! token ids in, f32 values and token ids out. Shared by eval's scoring and serve's engine.

use burn::tensor::{DType, Int, Tensor, TensorData};
use distill_models::Kernels;

use crate::InferError;

/// i64 ids [shape] on `device`.
pub fn int_tensor<B: Kernels, const D: usize>(
    data: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// A float tensor's values as f32, whatever its dtype (bf16 is widened on the device first).
pub fn to_f32<B: Kernels, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, InferError> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| InferError::Invalid(format!("tensor to host: {e:?}")))
}

/// An int tensor's values as token ids; a negative or too-large value is an error.
pub fn to_u32<B: Kernels, const D: usize>(t: Tensor<B, D, Int>) -> Result<Vec<u32>, InferError> {
    t.into_data()
        .iter::<i64>()
        .map(|v| u32::try_from(v).map_err(|_| InferError::Invalid(format!("token id {v} out of range"))))
        .collect()
}
