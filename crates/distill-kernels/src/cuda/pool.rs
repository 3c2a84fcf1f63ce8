//! The driver's stream-ordered memory pool under cubecl's allocations: what it keeps of what
//! cubecl frees, and its high-water marks.

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::sys as cu;

use super::stream::{Ordering, lock, run_on_stream};

/// Makes the device's stream-ordered allocator keep what cubecl frees (its release threshold
/// at the maximum), once per device. cubecl allocates its pages with `cuMemAllocAsync` and
/// frees them with `cuMemFreeAsync`; with the default threshold (0) the freed memory went
/// back to the driver at the next sync and each page freed by [`crate::MemoryPolicy::trim_memory`]
/// had to be mapped again a step later (6-8% of a 0.5B step). Kept, it serves the next
/// allocation of any size from the same physical memory.
pub(crate) fn retain_freed_memory(device: &burn::backend::cuda::CudaDevice) -> Result<(), String> {
    static DONE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    if lock(&DONE).contains(&device.index) {
        return Ok(());
    }
    run_on_stream(device, [], Ordering::Sync, |_, []| {
        // SAFETY: on cubecl's device thread (default_pool); the out pointer is a live local.
        unsafe {
            let pool = default_pool()?;
            let mut threshold = u64::MAX;
            cu::cuMemPoolSetAttribute(
                pool,
                cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast::<c_void>(),
            )
            .result()
            .map_err(|e| format!("cuMemPoolSetAttribute: {e}"))
        }
    })?;
    lock(&DONE).push(device.index);
    Ok(())
}

/// The current device's default stream-ordered memory pool, the one `cuMemAllocAsync` (so
/// cubecl) allocates from.
///
/// # Safety
/// Call on cubecl's device thread, where the device's context is current.
unsafe fn default_pool() -> Result<cu::CUmemoryPool, String> {
    let mut dev: cu::CUdevice = 0;
    // SAFETY: the caller's context is current; the out pointers are live locals.
    unsafe {
        cu::cuCtxGetDevice(&mut dev)
            .result()
            .map_err(|e| format!("cuCtxGetDevice: {e}"))?;
        let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
        cu::cuDeviceGetDefaultMemPool(&mut pool, dev)
            .result()
            .map_err(|e| format!("cuDeviceGetDefaultMemPool: {e}"))?;
        Ok(pool)
    }
}

/// The driver pool's high-water marks, in bytes: what it handed out (cubecl's buffers at
/// their allocated sizes) and what it had reserved from the device to do so, since the process
/// began (the first: since the last call with `reset`). Reserved above handed out is the
/// pool's own slack; nvidia-smi's peak above reserved is the context, module code and
/// cuBLAS's workspaces. The mark counts allocations when they are queued, so between two
/// device syncs it is exact.
pub fn driver_pool_peaks(
    device: &burn::backend::cuda::CudaDevice,
    reset: bool,
) -> Result<(u64, u64), String> {
    use cu::CUmemPool_attribute::{CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, CU_MEMPOOL_ATTR_USED_MEM_HIGH};
    let out = std::sync::Arc::new(Mutex::new((0u64, 0u64)));
    let sink = out.clone();
    run_on_stream(device, [], Ordering::Sync, move |_, []| {
        // SAFETY: run_on_stream runs this on cubecl's device thread.
        let pool = unsafe { default_pool()? };
        let attr = |attr: cu::CUmemPool_attribute, get: bool| -> Result<u64, String> {
            let mut v = 0u64;
            let p = (&mut v as *mut u64).cast::<c_void>();
            // SAFETY: a live pool and a u64, which these attributes take; setting a high
            // mark to 0 resets it to the current value.
            let r = unsafe {
                if get {
                    cu::cuMemPoolGetAttribute(pool, attr, p)
                } else {
                    cu::cuMemPoolSetAttribute(pool, attr, p)
                }
            };
            r.result()
                .map_err(|e| format!("cuMemPool{}Attribute: {e}", if get { "Get" } else { "Set" }))?;
            Ok(v)
        };
        let peaks = (
            attr(CU_MEMPOOL_ATTR_USED_MEM_HIGH, true)?,
            attr(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, true)?,
        );
        if reset {
            attr(CU_MEMPOOL_ATTR_USED_MEM_HIGH, false)?;
        }
        *lock(&sink) = peaks;
        Ok(())
    })?;
    let peaks = *lock(&out);
    Ok(peaks)
}
