//! The block inputs that recompute keeps between the forward and the backward, on the device
//! or parked in host memory (`train.offload_block_inputs`, what Unsloth calls offloaded
//! gradient checkpointing).
//!
//! Parking runs on a worker thread of its own: on CUDA, cubecl gives each thread its own
//! stream and orders them by the buffers they share, so the copies to and from the host run
//! beside the main thread's kernels instead of between them. The forward hands each input
//! over and goes on; the backward asks for the next input it will need as it takes the
//! current one, so the upload overlaps a block's backward.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData};

/// The inputs of the blocks, first block first, handed back last first.
pub(super) enum BlockInputs<B: Backend> {
    Device(Vec<Tensor<B, 3>>),
    Host(Parking<B>),
}

impl<B: Backend> BlockInputs<B> {
    pub(super) fn new(offload: bool) -> Self {
        if offload {
            BlockInputs::Host(Parking::start())
        } else {
            BlockInputs::Device(Vec::new())
        }
    }

    pub(super) fn push(&mut self, x: Tensor<B, 3>) {
        match self {
            BlockInputs::Device(xs) => xs.push(x),
            BlockInputs::Host(p) => p.park(x),
        }
    }

    /// The last input not yet taken. Parked inputs come back on their device, in their dtype.
    pub(super) fn pop(&mut self) -> Result<Tensor<B, 3>, String> {
        match self {
            BlockInputs::Device(xs) => xs.pop().ok_or_else(|| "no block input left".to_string()),
            BlockInputs::Host(p) => p.take_last(),
        }
    }
}

enum Job<B: Backend> {
    Park(usize, Tensor<B, 3>),
    Fetch(usize),
}

/// Host copies of block inputs, made and uploaded again by a worker thread.
pub(super) struct Parking<B: Backend> {
    jobs: Option<Sender<Job<B>>>,
    fetched: Receiver<(usize, Result<Tensor<B, 3>, String>)>,
    worker: Option<JoinHandle<()>>,
    /// Inputs parked and not yet taken back.
    parked: usize,
    /// The input whose upload was asked for and not yet received.
    in_flight: Option<usize>,
}

impl<B: Backend> Parking<B> {
    fn start() -> Self {
        let (jobs, inbox) = channel::<Job<B>>();
        let (send, fetched) = channel();
        let worker = std::thread::Builder::new()
            .name("distill-offload".into())
            .spawn(move || work(inbox, send))
            .expect("spawning the offload thread");
        Parking {
            jobs: Some(jobs),
            fetched,
            worker: Some(worker),
            parked: 0,
            in_flight: None,
        }
    }

    fn send(&self, job: Job<B>) {
        // The worker only stops when `jobs` is dropped; if it died, `take_last` says so.
        let _ = self.jobs.as_ref().expect("jobs open until drop").send(job);
    }

    fn park(&mut self, x: Tensor<B, 3>) {
        self.send(Job::Park(self.parked, x));
        self.parked += 1;
    }

    fn take_last(&mut self) -> Result<Tensor<B, 3>, String> {
        let i = self.parked.checked_sub(1).ok_or("no block input left")?;
        if self.in_flight != Some(i) {
            self.send(Job::Fetch(i));
        }
        let (got, x) = self
            .fetched
            .recv()
            .map_err(|_| "the offload thread stopped".to_string())?;
        debug_assert_eq!(got, i);
        self.parked = i;
        // The next one down uploads while the caller works on this one.
        self.in_flight = i.checked_sub(1);
        if let Some(next) = self.in_flight {
            self.send(Job::Fetch(next));
        }
        x
    }
}

impl<B: Backend> Drop for Parking<B> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A parked input: its data, and the device and dtype it goes back to.
type HostCopy<B> = (TensorData, <B as BackendTypes>::Device, DType);

/// The worker: parks inputs as host data and uploads them when asked, in the order asked.
fn work<B: Backend>(inbox: Receiver<Job<B>>, out: Sender<(usize, Result<Tensor<B, 3>, String>)>) {
    let mut parked: HashMap<usize, Result<HostCopy<B>, String>> = HashMap::new();
    for job in inbox {
        match job {
            Job::Park(i, x) => {
                let (device, dtype) = (x.device(), x.dtype());
                let data = x
                    .try_into_data()
                    .map(|d| (d, device, dtype))
                    .map_err(|e| format!("copying block input {i} to the host: {e:?}"));
                parked.insert(i, data);
            }
            Job::Fetch(i) => {
                let x = match parked.remove(&i) {
                    Some(Ok((data, device, dtype))) => Ok(Tensor::from_data(data, (&device, dtype))),
                    Some(Err(e)) => Err(e),
                    None => Err(format!("block input {i} was never parked")),
                };
                if out.send((i, x)).is_err() {
                    return;
                }
            }
        }
    }
}
