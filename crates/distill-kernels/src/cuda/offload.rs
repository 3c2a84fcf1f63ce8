//! Parking tensors in pinned host memory, copied on a stream beside cubecl's
//! ([`crate::MemoryPolicy::park`] on CUDA).
//!
//! Each compute stream (cubecl's, one per device and calling thread) gets a lane: a copy
//! stream and a pool of pinned host buffers. Copies out wait for the compute stream's work
//! queued before them and run beside what is queued after. The tensor being copied out stays
//! held until the next park or fetch, which makes the compute stream wait for that copy before
//! its buffer can be reused. The wait costs nothing where the work between two parks outlasts
//! a copy (a block's forward does); where it does not (the optimizer's groups, whose update is
//! one short kernel), the copies set the pace. Copies back go into a buffer
//! cubecl hands out at the fetch, after the compute stream's work queued so far, and the
//! compute stream waits for them at the landing.
//!
//! Everything here runs on cubecl's device thread (`run_on_stream`), in the order it was
//! asked for, so a lane's buffers and events need no other synchronisation. Pinned buffers go
//! back to their lane's pool, not to the driver: a training run parks the same sizes every
//! step, and pinning is slow (the pool holds at most what one step parked, per size).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as Atomic};

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::tensor::CubeTensor;
use cudarc::driver::sys as cu;

use super::nvrtc;
use super::stream::{lock, run_on_stream};

type CudaTensor = CubeTensor<CudaRuntime>;

/// A lane: a compute stream's copy stream and pinned buffers. Raw handles as integers, so
/// that the lanes can sit in a static.
#[derive(Default)]
struct Lane {
    /// The copy stream (a `CUstream`), made at the lane's first use.
    copies: usize,
    /// The last tensor parked, held until the compute stream waits for its copy-out (the
    /// `CUevent` recorded after it).
    leaving: Option<(usize, CudaTensor)>,
    /// Pinned buffers free for the next copy out.
    free: Vec<HostBuffer>,
    /// Buffers holding parked tensors, by park id.
    parked: HashMap<u64, HostBuffer>,
    /// Copies back not yet landed: park id -> the `CUevent` recorded after the copy.
    arriving: HashMap<u64, usize>,
}

struct HostBuffer {
    ptr: usize,
    capacity: usize,
}

/// (device index, cubecl stream id) -> its lane.
type Lanes = HashMap<(usize, u64), Lane>;
static LANES: Mutex<Option<Lanes>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A parked tensor's pinned copy (or the copy under way). Dropped without being fetched, it
/// gives its buffer back to the lane.
pub struct Pinned {
    key: (usize, u64),
    id: u64,
    device: burn::backend::cuda::CudaDevice,
    dtype: burn::tensor::DType,
    bytes: usize,
    taken: bool,
}

impl Pinned {
    /// The parked tensor's dtype.
    pub fn dtype(&self) -> burn::tensor::DType {
        self.dtype
    }
}

/// A copy back under way, which the compute stream waits for at [`land`].
pub struct Arrival {
    key: (usize, u64),
    id: u64,
    device: burn::backend::cuda::CudaDevice,
    landed: bool,
}

/// A contiguous tensor's size in bytes.
fn bytes_of(t: &CudaTensor) -> usize {
    t.meta.shape().as_slice().iter().product::<usize>() * t.dtype.size()
}

fn key_of(device: &burn::backend::cuda::CudaDevice) -> (usize, u64) {
    (device.index, StreamId::current().value)
}

/// Starts copying `x` into pinned host memory on the lane's copy stream.
pub fn park(x: CudaTensor) -> Result<Pinned, String> {
    let x = super::contiguous(x);
    let (bytes, dtype) = (bytes_of(&x), x.dtype);
    let device = x.device.clone();
    let (key, id) = (key_of(&device), NEXT_ID.fetch_add(1, Atomic::Relaxed));
    let binding = x.handle.clone().binding();
    run_on_stream(&device, [binding], nvrtc::ordering(), move |stream, [px]| {
        with_lane(key, |lane| {
            lane.let_go(stream)?;
            let host = lane.buffer(bytes)?;
            follow(lane.copies(), stream)?;
            // SAFETY: `host` holds at least `bytes` pinned bytes; `px` is x's live buffer of
            // `bytes` bytes, held (in `leaving`) until the compute stream has waited for the copy.
            unsafe { cu::cuMemcpyDtoHAsync_v2(host.ptr as *mut c_void, px, bytes, lane.copies()) }
                .result()
                .map_err(|e| format!("copying {bytes} bytes to host memory: {e}"))?;
            lane.leaving = Some((record(lane.copies())?, x));
            lane.parked.insert(id, host);
            Ok(())
        })
    })?;
    Ok(Pinned {
        key,
        id,
        device,
        dtype,
        bytes,
        taken: false,
    })
}

/// Starts copying a parked tensor back into `into` (a fresh buffer of its size).
pub fn fetch(mut parked: Pinned, into: &CudaTensor) -> Result<Arrival, String> {
    let (key, id, bytes) = (parked.key, parked.id, parked.bytes);
    let have = bytes_of(into);
    if have != bytes {
        return Err(format!("a parked tensor of {bytes} bytes fetched into {have}"));
    }
    parked.taken = true;
    let binding = into.handle.clone().binding();
    run_on_stream(
        &parked.device,
        [binding],
        nvrtc::ordering(),
        move |stream, [py]| {
            with_lane(key, |lane| {
                lane.let_go(stream)?;
                let host = lane
                    .parked
                    .remove(&id)
                    .ok_or("the parked tensor's copy is gone")?;
                // `into` was handed out as free after the compute stream's work queued so far.
                follow(lane.copies(), stream)?;
                // SAFETY: `host` holds the parked bytes; `py` is a live buffer of `bytes` bytes.
                let copied =
                    unsafe { cu::cuMemcpyHtoDAsync_v2(py, host.ptr as *const c_void, bytes, lane.copies()) };
                // A later copy into this buffer is queued behind this one on the copy stream.
                lane.free.push(host);
                copied
                    .result()
                    .map_err(|e| format!("copying {bytes} bytes back from host memory: {e}"))?;
                lane.arriving.insert(id, record(lane.copies())?);
                Ok(())
            })
        },
    )?;
    Ok(Arrival {
        key,
        id,
        device: parked.device.clone(),
        landed: false,
    })
}

/// Makes the compute stream wait, from here on, for the copy back to have arrived.
pub fn land(mut arrival: Arrival) -> Result<(), String> {
    arrival.landed = true;
    let (key, id) = (arrival.key, arrival.id);
    run_on_stream(&arrival.device, [], nvrtc::ordering(), move |stream, []| {
        with_lane(key, |lane| {
            let event = lane
                .arriving
                .remove(&id)
                .ok_or("the copy back was never started")?;
            wait_and_destroy(stream, event)
        })
    })
}

/// A parked tensor's bytes, copied from its pinned buffer once its copy out has finished.
pub fn read(parked: &Pinned) -> Result<Vec<u8>, String> {
    let (key, id, bytes) = (parked.key, parked.id, parked.bytes);
    let (send, receive) = std::sync::mpsc::channel();
    run_on_stream(&parked.device, [], nvrtc::ordering(), move |_, []| {
        let read = with_lane(key, |lane| {
            let host = lane.parked.get(&id).ok_or("the parked tensor's copy is gone")?;
            // SAFETY: the lane's live copy stream.
            unsafe { cu::cuStreamSynchronize(lane.copies()) }
                .result()
                .map_err(|e| format!("waiting for the copy to host memory: {e}"))?;
            // SAFETY: `host` holds at least `bytes` bytes, written by the finished copy.
            Ok(unsafe { std::slice::from_raw_parts(host.ptr as *const u8, bytes) }.to_vec())
        });
        let _ = send.send(read);
        Ok(())
    })?;
    receive
        .recv()
        .map_err(|_| "cubecl's device thread dropped the read".to_string())?
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let (key, id) = (self.key, self.id);
        // Best effort: on failure the buffer stays with its lane, unused.
        let _ = run_on_stream(&self.device, [], nvrtc::ordering(), move |_, []| {
            with_lane(key, |lane| {
                if let Some(host) = lane.parked.remove(&id) {
                    lane.free.push(host);
                }
                Ok(())
            })
        });
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if self.landed {
            return;
        }
        let (key, id) = (self.key, self.id);
        let _ = run_on_stream(&self.device, [], nvrtc::ordering(), move |stream, []| {
            with_lane(key, |lane| match lane.arriving.remove(&id) {
                // Its buffer may be reused by the compute stream: let that wait, too.
                Some(event) => wait_and_destroy(stream, event),
                None => Ok(()),
            })
        });
    }
}

fn with_lane<R>(key: (usize, u64), f: impl FnOnce(&mut Lane) -> Result<R, String>) -> Result<R, String> {
    let mut lanes = lock(&LANES);
    let lane = lanes.get_or_insert_with(HashMap::new).entry(key).or_default();
    if lane.copies == 0 {
        use cudarc::driver::result::stream::{StreamKind, create};
        lane.copies = create(StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e}"))? as usize;
    }
    f(lane)
}

impl Lane {
    fn copies(&self) -> cu::CUstream {
        self.copies as cu::CUstream
    }

    /// Lets the last parked tensor's buffer go, once the compute stream waits for its copy.
    fn let_go(&mut self, stream: cu::CUstream) -> Result<(), String> {
        match self.leaving.take() {
            Some((event, tensor)) => {
                let waited = wait_and_destroy(stream, event);
                drop(tensor);
                waited
            }
            None => Ok(()),
        }
    }

    /// The smallest free pinned buffer of at least `bytes`, or a new one.
    fn buffer(&mut self, bytes: usize) -> Result<HostBuffer, String> {
        let best = (self.free.iter().enumerate())
            .filter(|(_, b)| b.capacity >= bytes)
            .min_by_key(|(_, b)| b.capacity)
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(self.free.swap_remove(i));
        }
        let capacity = rounded_capacity(bytes);
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: on the device thread, with its context current; `ptr` is a live local.
        unsafe { cu::cuMemHostAlloc(&mut ptr, capacity, 0) }
            .result()
            .map_err(|e| format!("pinning {} MiB of host memory: {e}", capacity >> 20))?;
        Ok(HostBuffer {
            ptr: ptr as usize,
            capacity,
        })
    }
}

/// `bytes` rounded up to a multiple of an eighth of the largest power of two not above it
/// (at least 1 MiB): a tensor a little longer than last step's reuses its buffer, for at most
/// an eighth (or 1 MiB) more host memory.
fn rounded_capacity(bytes: usize) -> usize {
    let floor_pow2 = 1usize << (usize::BITS - 1 - bytes.max(1).leading_zeros());
    let granule = (floor_pow2 / 8).max(1 << 20);
    bytes.div_ceil(granule).max(1) * granule
}

/// Makes `copies` wait for the work queued on `stream` so far.
fn follow(copies: cu::CUstream, stream: cu::CUstream) -> Result<(), String> {
    let event = record(stream)?;
    wait_and_destroy(copies, event)
}

/// A new event recorded on `stream`.
fn record(stream: cu::CUstream) -> Result<usize, String> {
    let mut event: cu::CUevent = std::ptr::null_mut();
    // SAFETY: on the device thread; `event` is a live local and `stream` a live stream.
    unsafe {
        cu::cuEventCreate(&mut event, cu::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32)
            .result()
            .map_err(|e| format!("cuEventCreate: {e}"))?;
        cu::cuEventRecord(event, stream)
            .result()
            .map_err(|e| format!("cuEventRecord: {e}"))?;
    }
    Ok(event as usize)
}

/// Makes `stream` wait for `event`, then destroys the event (the wait stays queued).
fn wait_and_destroy(stream: cu::CUstream, event: usize) -> Result<(), String> {
    let event = event as cu::CUevent;
    // SAFETY: a live event made by `record`, destroyed once, after the wait is queued.
    unsafe {
        let waited = cu::cuStreamWaitEvent(stream, event, 0).result();
        let _ = cu::cuEventDestroy_v2(event);
        waited.map_err(|e| format!("cuStreamWaitEvent: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::rounded_capacity;

    #[test]
    fn pinned_buffers_round_up_by_at_most_an_eighth() {
        assert_eq!(rounded_capacity(0), 1 << 20);
        assert_eq!(rounded_capacity(1000), 1 << 20);
        let block_input = 16_384 * 3_584 * 2; // 7B at 16k tokens: 14 x 8 MiB
        assert_eq!(rounded_capacity(block_input), block_input);
        assert_eq!(rounded_capacity(block_input + 1), block_input + (8 << 20));
        for bytes in [(1 << 20) + 1, (3 << 20) + 1, 117_440_513, (1 << 30) - 1, 1 << 30] {
            let c = rounded_capacity(bytes);
            assert!(
                c >= bytes && c - bytes <= (bytes / 8).max(1 << 20),
                "{bytes} -> {c}"
            );
        }
    }
}
