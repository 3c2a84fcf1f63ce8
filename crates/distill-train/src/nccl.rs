//! NCCL as the data-parallel group of CUDA training ([`crate::parallel`]): one member per GPU
//! of this process, summing on the GPUs.

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use distill_kernels::cuda::nccl::{NcclComm, communicators};

use crate::parallel::{Collective, CollectiveError};

/// One GPU's member of an NCCL group.
pub struct Nccl(NcclComm);

/// A group over `devices` (rank i on devices[i]), one member each, in order, for the CUDA
/// backend `B` (`Cuda<bf16>` or `Cuda<f32>`).
pub fn members<B: Backend>(devices: &[CudaDevice]) -> Result<Vec<Box<dyn Collective<B>>>, String>
where
    Nccl: Collective<B>,
{
    Ok(communicators(devices)?
        .into_iter()
        .map(|c| Box::new(Nccl(c)) as Box<dyn Collective<B>>)
        .collect())
}

impl Nccl {
    fn error(&self, message: String) -> CollectiveError {
        CollectiveError {
            rank: self.0.rank(),
            world: self.0.world(),
            message,
        }
    }
}

macro_rules! nccl_collective {
    ($float:ty) => {
        impl Collective<Cuda<$float>> for Nccl {
            fn rank(&self) -> usize {
                self.0.rank()
            }

            fn world(&self) -> usize {
                self.0.world()
            }

            fn all_reduce_sum(
                &self,
                x: Tensor<Cuda<$float>, 1>,
            ) -> Result<Tensor<Cuda<$float>, 1>, CollectiveError> {
                self.0.all_reduce_sum(x).map_err(|e| self.error(e))
            }

            fn reduce_sum(
                &self,
                root: usize,
                x: Tensor<Cuda<$float>, 1>,
            ) -> Result<Option<Tensor<Cuda<$float>, 1>>, CollectiveError> {
                let summed = self.0.reduce_sum(root, x).map_err(|e| self.error(e))?;
                Ok((self.0.rank() == root).then_some(summed))
            }

            fn broadcast(
                &self,
                root: usize,
                x: Tensor<Cuda<$float>, 1>,
            ) -> Result<Tensor<Cuda<$float>, 1>, CollectiveError> {
                self.0.broadcast(root, x).map_err(|e| self.error(e))
            }

            /// Through a small f32 tensor on the GPU: the sums come back with a device sync.
            fn all_reduce_host(&self, xs: &[f64]) -> Result<Vec<f64>, CollectiveError> {
                let values: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
                let n = values.len();
                let x = Tensor::<Cuda<$float>, 1>::from_data(
                    TensorData::new(values, [n]),
                    (self.0.device(), DType::F32),
                );
                let summed = self.0.all_reduce_sum(x).map_err(|e| self.error(e))?;
                let data = summed
                    .try_into_data()
                    .map_err(|e| self.error(format!("reading the sums back: {e:?}")))?;
                let sums = data
                    .to_vec::<f32>()
                    .map_err(|e| self.error(format!("reading the sums back: {e:?}")))?;
                Ok(sums.into_iter().map(f64::from).collect())
            }

            fn abort(&self, _why: &str) {
                self.0.abort();
            }
        }
    };
}

nccl_collective!(f32);
nccl_collective!(half::bf16);
