//! Tensors parked in host memory between a training step's forward and its backward
//! ([`crate::MemoryPolicy::park`]): what Unsloth calls offloaded gradient checkpointing.
//!
//! Three moves: [`crate::MemoryPolicy::park`] starts the copy out and lets the device buffer
//! go once it is done; [`crate::MemoryPolicy::fetch`] starts the copy back into a new buffer;
//! [`crate::MemoryPolicy::land`] hands that buffer over once the copy has arrived. Fetching
//! one tensor ahead of landing it is what lets the upload run beside the work in between.
//! The defaults copy through burn's `into_data` / `from_data`, synchronously; CUDA copies
//! through pinned host memory on a stream of its own (`cuda::offload`).

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData};

/// A tensor's contents in host memory, with the device and shape it goes back to (the host
/// copy knows its dtype).
pub struct Parked<B: Backend> {
    pub(crate) device: B::Device,
    pub(crate) shape: Vec<usize>,
    pub(crate) host: HostCopy,
}

pub(crate) enum HostCopy {
    /// burn's host copy (the default).
    Data(TensorData),
    /// Pinned host memory written by a copy on the device's copy stream.
    #[cfg(feature = "cuda")]
    Pinned(crate::cuda::offload::Pinned),
}

/// A tensor on its way back to the device: its buffer, and what the device must wait for
/// before reading it.
pub struct Fetched<B: Backend> {
    pub(crate) tensor: FloatTensor<B>,
    pub(crate) shape: Vec<usize>,
    #[cfg(feature = "cuda")]
    pub(crate) arrival: Option<crate::cuda::offload::Arrival>,
}

impl<B: Backend> Fetched<B> {
    pub(crate) fn ready(tensor: FloatTensor<B>, shape: Vec<usize>) -> Self {
        Fetched {
            tensor,
            shape,
            #[cfg(feature = "cuda")]
            arrival: None,
        }
    }
}

/// [`crate::MemoryPolicy::park`] by default: burn's host copy, made now.
pub fn park_default<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Parked<B>, String> {
    let (device, shape) = (x.device(), x.dims().to_vec());
    let data = x
        .try_into_data()
        .map_err(|e| format!("copying a tensor to host memory: {e:?}"))?;
    Ok(Parked {
        device,
        shape,
        host: HostCopy::Data(data),
    })
}

/// [`crate::MemoryPolicy::fetch`] by default: burn's upload, made now.
pub fn fetch_default<B: Backend>(parked: Parked<B>) -> Result<Fetched<B>, String> {
    match parked.host {
        HostCopy::Data(data) => Ok(Fetched::ready(
            B::float_from_data(data, &parked.device),
            parked.shape,
        )),
        #[cfg(feature = "cuda")]
        HostCopy::Pinned(_) => Err("a tensor parked in pinned memory fetched by another backend".into()),
    }
}

/// [`crate::MemoryPolicy::land`] by default: the fetched tensor as it is.
pub fn land_default<B: Backend, const D: usize>(fetched: Fetched<B>) -> Result<Tensor<B, D>, String> {
    if fetched.shape.len() != D {
        return Err(format!(
            "a parked tensor of shape {:?} taken back with rank {D}",
            fetched.shape
        ));
    }
    Ok(crate::tensor(fetched.tensor))
}

/// [`crate::MemoryPolicy::read_parked`] by default: a copy of burn's host data.
pub fn read_default<B: Backend>(parked: &Parked<B>) -> Result<TensorData, String> {
    match &parked.host {
        HostCopy::Data(data) => Ok(data.clone()),
        #[cfg(feature = "cuda")]
        HostCopy::Pinned(_) => Err("a tensor parked in pinned memory read by another backend".into()),
    }
}
