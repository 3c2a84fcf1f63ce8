//! NCCL on burn's CUDA tensors: the all-reduce that data-parallel training sums its gradients
//! with, across the GPUs of one host, issued on cubecl's stream like our other kernels (no
//! host sync). One process drives every GPU (`ncclCommInitAll`); each device's work is issued
//! from its own cubecl device thread, so NCCL needs no group calls.
//!
//! libnccl is loaded at run time (cudarc's dynamic loading): a `cuda` build starts on machines
//! without it, and only `--gpus N` with N > 1 asks for it.

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as Atomic};

use burn::backend::cuda::CudaDevice;
use burn::tensor::{DType, Tensor};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cudarc::nccl::{result, sys};

use super::{contiguous, stream};
use crate::{prim, tensor};

/// A flat f32 [N] tensor on burn's CUDA backend, as the collectives take and give.
type Flat<F, I, BT> = Tensor<CubeBackend<CudaRuntime, F, I, BT>, 1>;

/// One GPU's member of an NCCL communicator over the GPUs of this process.
pub struct NcclComm {
    all: Arc<Comms>,
    device: CudaDevice,
    rank: usize,
    world: usize,
}

/// Every member's communicator, shared by the members, so that one member's failure aborts
/// them all: the others may be waiting in a collective it will never join.
struct Comms {
    comms: Vec<sys::ncclComm_t>,
    aborted: AtomicBool,
}

// SAFETY: NCCL communicators may be used from any thread. Each member issues its collectives
// only on its device's cubecl thread (run_on_stream), one at a time; abort may come from any
// thread, which NCCL allows.
unsafe impl Send for Comms {}
unsafe impl Sync for Comms {}

impl Drop for Comms {
    fn drop(&mut self) {
        if !self.aborted.load(Atomic::Relaxed) {
            for &comm in &self.comms {
                // SAFETY: made by ncclCommInitAll and not freed since (no abort).
                let _ = unsafe { result::comm_destroy(comm) };
            }
        }
    }
}

/// A communicator over `devices`, rank i on devices[i]: one member per device, in order.
pub fn communicators(devices: &[CudaDevice]) -> Result<Vec<NcclComm>, String> {
    // SAFETY: only tries to dlopen libnccl.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "NCCL could not be loaded (libnccl.so); HINT: install NCCL (Debian/Ubuntu: libnccl2 and libnccl-dev; \
             pip: nvidia-nccl-cu12, whose lib/ holds libnccl.so.2: link it as libnccl.so) and put its directory on LD_LIBRARY_PATH"
                .into(),
        );
    }
    let ids: Vec<c_int> = devices.iter().map(|d| d.index as c_int).collect();
    let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
    // SAFETY: one communicator slot per device id; NCCL fills them all or fails.
    unsafe { result::comm_init_all(comms.as_mut_ptr(), ids.len() as c_int, ids.as_ptr()) }
        .map_err(|e| format!("ncclCommInitAll over CUDA devices {ids:?}: {e:?}"))?;
    let all = Arc::new(Comms {
        comms,
        aborted: AtomicBool::new(false),
    });
    Ok(devices
        .iter()
        .enumerate()
        .map(|(rank, device)| NcclComm {
            all: all.clone(),
            device: device.clone(),
            rank,
            world: devices.len(),
        })
        .collect())
}

impl NcclComm {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// Σ over the communicator's GPUs of `x` (f32 [N], on this member's device), as a new
    /// tensor, queued on cubecl's stream after the work that wrote `x`.
    pub fn all_reduce_sum<F, I, BT>(&self, x: Flat<F, I, BT>) -> Result<Flat<F, I, BT>, String>
    where
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        // SAFETY: send and recv are n f32s on this member's device, the stream is cubecl's for
        // it, and the communicator is alive (see `collective`).
        self.collective(x, "ncclAllReduce", |send, recv, n, comm, stream| unsafe {
            result::all_reduce(
                send,
                recv,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream,
            )
        })
    }

    /// Runs `call(send, recv, n, comm, stream)`, an NCCL collective from `x` (f32 [n]) into a
    /// new tensor of n f32s, on cubecl's stream for this device after the work that wrote `x`.
    fn collective<F, I, BT, C>(
        &self,
        x: Flat<F, I, BT>,
        name: &'static str,
        call: C,
    ) -> Result<Flat<F, I, BT>, String>
    where
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        C: FnOnce(
                *const c_void,
                *mut c_void,
                usize,
                sys::ncclComm_t,
                sys::cudaStream_t,
            ) -> Result<result::NcclStatus, result::NcclError>
            + Send
            + 'static,
    {
        if self.all.aborted.load(Atomic::Relaxed) {
            return Err(format!("{name}: the NCCL communicator was aborted"));
        }
        if x.dtype() != DType::F32 {
            return Err(format!("{name} of a {:?} tensor; it takes f32", x.dtype()));
        }
        let n = x.dims()[0];
        let x = contiguous(prim(x));
        let out =
            empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), vec![n].into(), DType::F32);
        if n == 0 {
            return Ok(tensor(out));
        }
        let bindings = [&x, &out].map(|t| t.handle.clone().binding());
        // The communicator's address: the closure runs on cubecl's device thread, and `self`
        // outlives it (the caller reads `out` before the group is dropped).
        let comm = self.all.comms[self.rank] as usize;
        stream::run_on_stream(
            &self.device,
            bindings,
            stream::Ordering::Stream,
            move |stream, [send, recv]| {
                call(
                    send as *const c_void,
                    recv as *mut c_void,
                    n,
                    comm as sys::ncclComm_t,
                    stream as sys::cudaStream_t,
                )
                .map(|_| ())
                .map_err(|e| format!("{name} of {n} f32: {e:?}"))
            },
        )?;
        Ok(tensor(out))
    }

    /// Σ over the communicator's GPUs of `x` (f32 [N]) on member `root`, as a new tensor
    /// there (the others' result holds nothing).
    pub fn reduce_sum<F, I, BT>(&self, root: usize, x: Flat<F, I, BT>) -> Result<Flat<F, I, BT>, String>
    where
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        // SAFETY: as in all_reduce_sum.
        self.collective(x, "ncclReduce", move |send, recv, n, comm, stream| unsafe {
            result::reduce(
                send,
                recv,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                root as c_int,
                comm,
                stream,
            )
        })
    }

    /// Member `root`'s `x` (f32 [N]) on every member, as a new tensor; the others' `x` gives
    /// only the length.
    pub fn broadcast<F, I, BT>(&self, root: usize, x: Flat<F, I, BT>) -> Result<Flat<F, I, BT>, String>
    where
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        // SAFETY: as in all_reduce_sum.
        self.collective(x, "ncclBroadcast", move |send, recv, n, comm, stream| unsafe {
            result::broadcast(
                send,
                recv,
                n,
                sys::ncclDataType_t::ncclFloat32,
                root as c_int,
                comm,
                stream,
            )
        })
    }

    /// Stops every member's pending and later collectives (this member failed and will never
    /// join them): NCCL returns from them instead of waiting. The run is over by then: a
    /// collective already on its way to the device thread may still reach the freed
    /// communicator.
    pub fn abort(&self) {
        if !self.all.aborted.swap(true, Atomic::Relaxed) {
            for &comm in &self.all.comms {
                // SAFETY: valid until aborted or dropped; abort frees it.
                let _ = unsafe { result::comm_abort(comm) };
            }
        }
    }
}
