//! The bridge to cubecl's device thread and CUDA stream, which cuBLAS calls and our NVRTC
//! kernels share: work is queued on the device thread that owns the `CudaServer`, after every
//! kernel the caller launched before it.
//!
//! Ordering on the GPU ([`Ordering`]): cubecl launches on its own non-blocking CUstream per
//! caller thread (per `StreamId`). `Ordering::Stream` (the default) asks the server for that
//! stream (`CudaServer::cu_stream`, an accessor our vendored cubecl-cuda adds: see
//! patches/README.md) and sets it on the cuBLAS handle: the GEMM is then ordered like any
//! cubecl kernel, with no host sync, and freeing/reusing the input buffers afterwards is
//! stream-ordered as cubecl expects. Work queued that way that fails is recorded on the
//! stream (`CudaServer::record_stream_error`), so cubecl reports it at the caller's next sync
//! or read (burn's `try_into_data` returns it, `into_data` panics with it), as a failed kernel
//! launch. With `DISTILL_CUBLAS=sync`, `Ordering::Sync` drains cubecl's stream first, runs the
//! GEMM on a stream of ours and waits for it (two host syncs per GEMM).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering as Atomic};
use std::sync::{Mutex, OnceLock};

use burn_cubecl::cubecl::Runtime;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::device::Device as _;
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::future::block_on;
use burn_cubecl::cubecl::server::{Binding, ComputeServer};
use burn_cubecl::cubecl::stream_id::StreamId;
use cudarc::driver::sys as cu;

type Server = <CudaRuntime as Runtime>::Server;

/// How cuBLAS calls are ordered against cubecl's kernels. Set by `DISTILL_CUBLAS`
/// (`stream` | `sync` | `off`) at first use, or by [`set_ordering`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ordering {
    /// On cubecl's own CUDA stream for the calling thread: no host sync.
    Stream,
    /// On a stream of ours, between a sync of cubecl's stream and a sync of ours.
    Sync,
    /// cuBLAS not used: burn's matmul.
    Off,
}

static MODE: AtomicU8 = AtomicU8::new(0); // 0: not read from the environment yet

fn code(o: Ordering) -> u8 {
    match o {
        Ordering::Stream => 1,
        Ordering::Sync => 2,
        Ordering::Off => 3,
    }
}

/// The ordering in force; the first call reads `DISTILL_CUBLAS`.
pub fn ordering() -> Ordering {
    match MODE.load(Atomic::Relaxed) {
        1 => Ordering::Stream,
        2 => Ordering::Sync,
        3 => Ordering::Off,
        _ => {
            let from_env = match std::env::var("DISTILL_CUBLAS").as_deref() {
                Err(_) | Ok("") | Ok("stream") | Ok("on") | Ok("1") => Ordering::Stream,
                Ok("sync") => Ordering::Sync,
                Ok("off") | Ok("0") => Ordering::Off,
                Ok(other) => {
                    eprintln!(
                        "warning: DISTILL_CUBLAS={other:?} is not one of stream, sync, off; using stream"
                    );
                    Ordering::Stream
                }
            };
            let _ = MODE.compare_exchange(0, code(from_env), Atomic::Relaxed, Atomic::Relaxed);
            ordering()
        }
    }
}

/// Switch cuBLAS ordering (or cuBLAS itself) for every later GEMM, e.g. to compare in a benchmark.
pub fn set_ordering(o: Ordering) {
    MODE.store(code(o), Atomic::Relaxed);
}

/// The stream the last work of ours ran on: 0 none yet, SYNCED host-synced, else cubecl's stream.
static LAST_STREAM: AtomicUsize = AtomicUsize::new(0);
const SYNCED: usize = 1;
static SYNC_REASON: OnceLock<String> = OnceLock::new();

/// Where the last GPU work of ours ran: not yet, host-synced (and why), or on cubecl's stream.
pub(crate) fn last_launch() -> String {
    match LAST_STREAM.load(Atomic::Relaxed) {
        0 => "none yet".to_string(),
        SYNCED => format!("host-synced ({})", SYNC_REASON.get().map_or("?", String::as_str)),
        addr => format!("on cubecl's stream {addr:#x}"),
    }
}

/// CUDA device 0, or None (after printing SKIPPED) when the driver or a device is missing:
/// the GPU tests call this first, so that `cargo test --features cuda` passes on a machine
/// without a GPU. Under `DISTILL_REQUIRE_GPU=1` a missing device panics instead
/// (`distill_core::testing::skip_gpu_test`, the rule every GPU test follows).
pub fn first_cuda_device() -> Option<burn::backend::cuda::CudaDevice> {
    cuda_devices().map(|mut all| all.swap_remove(0))
}

/// Every CUDA device the driver shows (at least one), or None as [`first_cuda_device`].
pub fn cuda_devices() -> Option<Vec<burn::backend::cuda::CudaDevice>> {
    match device_count().and_then(|n| {
        if n < 1 {
            Err("no CUDA device".to_string())
        } else {
            Ok(n)
        }
    }) {
        Ok(n) => Some((0..n).map(burn::backend::cuda::CudaDevice::new).collect()),
        Err(why) => {
            distill_core::testing::skip_gpu_test(&why);
            None
        }
    }
}

/// How many CUDA devices the driver shows (`CUDA_VISIBLE_DEVICES` applied), or why none can
/// be counted.
pub fn device_count() -> Result<usize, String> {
    // SAFETY: only tries to dlopen libcuda.
    if !unsafe { cu::is_culib_present() } {
        return Err("no CUDA device: libcuda could not be loaded".to_string());
    }
    cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("no CUDA device: {e}"))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `work` on cubecl's device thread for `device`, between the calling thread's earlier and
/// later kernel launches, with the device pointers of `bindings` (offsets included) and the
/// stream to issue on: cubecl's own stream for the calling thread (`Ordering::Stream`), or,
/// after a sync of that stream, a stream of ours that is synced again afterwards
/// (`Ordering::Sync`, or if cubecl does not give its stream). `work` may run after this
/// returns (once this thread's work has run on cubecl's stream, later work is queued without
/// waiting, like a kernel launch); an error there is recorded on cubecl's stream, since the
/// caller has moved on with outputs that were never written: cubecl returns it at the
/// thread's next sync or read of the device (burn's `try_into_data`), as a failed launch.
pub(crate) fn run_on_stream<const N: usize, W>(
    device: &burn::backend::cuda::CudaDevice,
    bindings: [Binding; N],
    mode: Ordering,
    work: W,
) -> Result<(), String>
where
    W: FnOnce(cu::CUstream, [u64; N]) -> Result<(), String> + Send + 'static,
{
    run_on_stream_all(device, bindings.into(), mode, move |stream, ptrs| {
        let ptrs: [u64; N] = ptrs.try_into().expect("one pointer per binding");
        work(stream, ptrs)
    })
}

/// [`run_on_stream`] for any number of buffers: `work` gets their pointers in `bindings`'
/// order. A whole decoding step is one such call ([`super::decode`]).
pub(crate) fn run_on_stream_all<W>(
    device: &burn::backend::cuda::CudaDevice,
    bindings: Vec<Binding>,
    mode: Ordering,
    work: W,
) -> Result<(), String>
where
    W: FnOnce(cu::CUstream, Vec<u64>) -> Result<(), String> + Send + 'static,
{
    let index = device.index;
    let runner = DeviceHandle::<Server>::new(device.to_id());
    static READY: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());
    let key = (index, StreamId::current().value);
    if mode == Ordering::Stream && lock(&READY).contains(&key) {
        runner.submit(move |server: &mut Server| {
            if let Err(e) = on_device(server, index, bindings, mode, work) {
                let reason = format!("GPU work queued on cubecl's stream failed: {e}");
                eprintln!("error: {reason} (reported at this thread's next sync or read)");
                // The runner thread executes tasks under the submitting thread's stream id.
                server.record_stream_error(StreamId::current(), reason);
            }
        });
        return Ok(());
    }
    let on_stream = runner
        .submit_blocking(move |server: &mut Server| on_device(server, index, bindings, mode, work))
        .map_err(|e| format!("cubecl's device thread did not answer: {e:?}"))??;
    if on_stream {
        lock(&READY).push(key);
    }
    Ok(())
}

/// Runs `f` on cubecl's device thread and waits for its result: after every task queued
/// before it, but without waiting for their GPU work (what `f` waits for is its own choice).
pub(crate) fn on_device_thread<R, F>(device: &burn::backend::cuda::CudaDevice, f: F) -> Result<R, String>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    DeviceHandle::<Server>::new(device.to_id())
        .submit_blocking(move |_: &mut Server| f())
        .map_err(|e| format!("cubecl's device thread did not answer: {e:?}"))
}

/// [`run_on_stream`]'s part on the device thread. Ok(true): queued on cubecl's stream;
/// Ok(false): done, host-synced.
fn on_device<W>(
    server: &mut Server,
    device: usize,
    bindings: Vec<Binding>,
    mode: Ordering,
    work: W,
) -> Result<bool, String>
where
    W: FnOnce(cu::CUstream, Vec<u64>) -> Result<(), String>,
{
    // The runner thread executes tasks under the submitting thread's stream id.
    let stream_id = StreamId::current();
    // Each call also makes this stream wait for the buffer's writes on other streams, and
    // makes the CUDA context current on this thread.
    let mut resources = Vec::with_capacity(bindings.len());
    for (i, binding) in bindings.into_iter().enumerate() {
        let r = server
            .get_resource(binding, stream_id)
            .map_err(|e| format!("buffer {i}: {e:?}"))?;
        resources.push(r);
    }
    let ptrs: Vec<u64> = resources.iter().map(|r| r.resource().ptr).collect();

    let stream = match mode {
        Ordering::Stream => server
            .cu_stream(stream_id)
            .map_err(|e| format!("cubecl gave no stream: {e:?}")),
        _ => Err("DISTILL_CUBLAS=sync".to_string()),
    };
    let on_stream = match stream {
        Ok(stream) => {
            work(stream, ptrs)?;
            LAST_STREAM.store(stream as usize, Atomic::Relaxed);
            true
        }
        Err(why) => {
            // A deliberate one-off sync (`nvrtc::ensure_loaded`) is not worth a note.
            let chosen = mode == Ordering::Stream || ordering() == Ordering::Sync;
            if chosen && SYNC_REASON.set(why.clone()).is_ok() {
                eprintln!("note: cuBLAS GEMMs and fused kernels are ordered by host syncs ({why})");
            }
            block_on(server.sync(stream_id)).map_err(|e| format!("syncing cubecl's stream: {e:?}"))?;
            let own = own_stream(device)?;
            work(own, ptrs)?;
            // SAFETY: `own` is a live stream of the current context.
            unsafe { cu::cuStreamSynchronize(own) }
                .result()
                .map_err(|e| format!("waiting for the work: {e}"))?;
            // Only what the ordering decided: a one-off sync (a module load, the pool's
            // settings) says nothing of how the GEMMs run, which `describe` reports.
            if chosen {
                LAST_STREAM.store(SYNCED, Atomic::Relaxed);
            }
            false
        }
    };
    // The resources drop here: their memory may be reused by later work on this stream, which
    // the work precedes (Stream) or has finished before (Sync).
    drop(resources);
    Ok(on_stream)
}

/// A non-blocking stream of ours on `device`, for `Ordering::Sync`; created on first need.
fn own_stream(device: usize) -> Result<cu::CUstream, String> {
    static OWN: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    let mut own = lock(OWN.get_or_init(Default::default));
    if let Some(&s) = own.get(&device) {
        return Ok(s as cu::CUstream);
    }
    use cudarc::driver::result::stream::{StreamKind, create};
    let stream = create(StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e}"))?;
    own.insert(device, stream as usize);
    Ok(stream)
}
