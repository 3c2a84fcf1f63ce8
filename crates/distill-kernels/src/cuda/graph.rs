//! A decoding step replayed from a CUDA graph: the step's launches are captured once, then
//! each step launches the graph, with what changes between steps (the position, the number
//! of keys and its splits, the step's input buffers) written into the kernel nodes first.
//!
//! Why: at small batch a step is a few hundred launches of a few microseconds of GPU work
//! each, and issuing them one by one keeps the GPU waiting on the host. A graph launch is one
//! call, and the GPU runs the nodes back to back.
//!
//! How a step knows its graph still holds: the step's code runs every time, issuing through
//! an [`Issuer`]. The first run of a [`Replays`] issues directly (it also warms cuBLAS's
//! handle, which must not be created inside a capture); the second is captured; later runs
//! replay, comparing each launch with the node captured at its place. A kernel whose
//! arguments or grid differ gets its node's parameters set; anything else that differs
//! (another kernel, a GEMM or copy with other pointers or sizes, more or fewer launches)
//! throws the graph away and captures the step anew. So a graph runs exactly the work the
//! step would have issued directly, to the same results bit for bit.

use std::ffi::c_void;

use cudarc::driver::sys as cu;

use super::nvrtc::{self, Call, Launch};
use super::timing::{StepClock, Timeline};

/// Why a run through an [`Issuer`] stopped.
pub(super) enum Issue {
    /// The step issues something its graph does not hold: capture it anew.
    Changed,
    /// CUDA (or an argument) failed.
    Failed(String),
}

impl From<String> for Issue {
    fn from(e: String) -> Self {
        Issue::Failed(e)
    }
}

/// What was issued at one place of a captured step.
enum Op {
    /// A kernel: its node, function, launch and argument slots as last set.
    Kernel {
        node: cu::CUgraphNode,
        function: usize,
        how: Launch,
        slots: Vec<u64>,
    },
    /// Work whose nodes we do not address (a cuBLAS GEMM, a copy), by what decides it.
    Other(Vec<u64>),
}

/// A captured step: the graph, its executable instance and what was issued into it, in order.
struct Graph {
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
    ops: Vec<Op>,
}

// SAFETY: graph handles are only used on cubecl's device thread, under [`Replays`]' owner's
// lock; a graph is destroyed there too (see `super::decode::State`).
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both were created by this Graph and are destroyed once; a launch still in
        // flight completes first (the driver frees the instance when it is done).
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
            cu::cuGraphDestroy(self.graph);
        }
    }
}

enum How<'a> {
    Direct,
    Capture(Vec<Op>),
    Replay { graph: &'a mut Graph, next: usize },
}

/// Where a step's launches go: straight to the stream, into a capture, or checked against
/// (and written into) a captured graph.
pub(super) struct Issuer<'a> {
    stream: cu::CUstream,
    how: How<'a>,
    /// Direct launches' GPU times, where profiled.
    timeline: Option<Timeline>,
}

impl Issuer<'_> {
    /// An issuer that launches on `stream`, with no graph.
    pub(super) fn direct(stream: cu::CUstream) -> Self {
        Issuer {
            stream,
            how: How::Direct,
            timeline: None,
        }
    }

    /// [`Issuer::direct`] with an event after each launch ([`super::timing::profile`]).
    pub(super) fn profiled(stream: cu::CUstream) -> Result<Self, String> {
        Ok(Issuer {
            timeline: Some(Timeline::start(stream)?),
            ..Issuer::direct(stream)
        })
    }

    /// Ends a profiled step: waits for it and adds its launches' times up.
    pub(super) fn finish(self) -> Result<(), String> {
        self.timeline.map_or(Ok(()), Timeline::finish)
    }

    /// After a direct launch: its mark, where profiled.
    fn mark(&mut self, name: &'static str) -> Result<(), Issue> {
        match &mut self.timeline {
            Some(t) => t.mark(name, self.stream).map_err(Issue::Failed),
            None => Ok(()),
        }
    }

    /// Issues kernel `call`, `function` being its `CUfunction`.
    pub(super) fn kernel(&mut self, function: usize, call: &Call) -> Result<(), Issue> {
        let launch = |stream| nvrtc::launch_function(function, call.name, call.how, stream, &call.args);
        match &mut self.how {
            How::Direct => {
                launch(self.stream)?;
                self.mark(call.name)
            }
            How::Capture(ops) => {
                let slots = nvrtc::slots(&call.args)
                    .ok_or_else(|| format!("{}: a struct argument cannot be replayed", call.name))?;
                launch(self.stream)?;
                ops.push(Op::Kernel {
                    node: last_node(self.stream)?,
                    function,
                    how: call.how,
                    slots,
                });
                Ok(())
            }
            How::Replay { graph, next } => {
                let exec = graph.exec;
                let op = graph.ops.get_mut(*next);
                *next += 1;
                let Some(Op::Kernel {
                    node,
                    function: f,
                    how,
                    slots,
                }) = op
                else {
                    return Err(Issue::Changed);
                };
                let new = nvrtc::slots(&call.args).ok_or(Issue::Changed)?;
                if *f != function || new.len() != slots.len() {
                    return Err(Issue::Changed);
                }
                if new != *slots || *how != call.how {
                    *slots = new;
                    *how = call.how;
                    set_params(exec, *node, function, call.how, slots)
                        .map_err(|e| format!("{}: {e}", call.name))?;
                }
                Ok(())
            }
        }
    }

    /// Issues other work, `name`, through `issue`; `key` is everything that decides what it
    /// does (pointers, sizes), which a replay compares with the captured one's.
    pub(super) fn other(
        &mut self,
        name: &'static str,
        key: &[u64],
        issue: impl FnOnce(cu::CUstream) -> Result<(), String>,
    ) -> Result<(), Issue> {
        match &mut self.how {
            How::Direct => {
                issue(self.stream)?;
                self.mark(name)
            }
            How::Capture(ops) => {
                issue(self.stream)?;
                ops.push(Op::Other(key.to_vec()));
                Ok(())
            }
            How::Replay { graph, next } => {
                let same = matches!(graph.ops.get(*next), Some(Op::Other(k)) if k == key);
                *next += 1;
                if same { Ok(()) } else { Err(Issue::Changed) }
            }
        }
    }
}

/// How the last step was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Direct,
    Captured,
    Replayed,
}

/// One cache's step graph across its steps ([`Replays::issue`]), and the clock of its steps'
/// GPU time.
#[derive(Default)]
pub(super) struct Replays {
    pub clock: StepClock,
    graph: Option<Graph>,
    runs: usize,
    /// Why capturing failed, if it did: the steps then stay direct.
    off: Option<String>,
}

impl Replays {
    /// Issues one step, `body`, on `stream`: replayed from the graph where it still holds,
    /// else captured (from the second run on) and launched, else directly. `body` may run up
    /// to three times; only the last run's work reaches the GPU.
    pub(super) fn issue<F>(&mut self, stream: cu::CUstream, body: F) -> Result<Path, String>
    where
        F: Fn(&mut Issuer<'_>) -> Result<(), Issue>,
    {
        self.runs += 1;
        if let Some(graph) = self.graph.as_mut() {
            let mut is = Issuer {
                stream,
                how: How::Replay { graph, next: 0 },
                timeline: None,
            };
            let replayed = body(&mut is);
            match (replayed, is.how) {
                (Ok(()), How::Replay { graph, next }) if next == graph.ops.len() => {
                    launch(graph.exec, stream)?;
                    return Ok(Path::Replayed);
                }
                (Err(Issue::Failed(e)), _) => {
                    self.graph = None;
                    self.turn_off(format!("replaying failed: {e}"));
                }
                _ => self.graph = None,
            }
        }
        if self.runs > 1 && self.off.is_none() {
            match capture(stream, &body) {
                Ok(graph) => {
                    launch(graph.exec, stream)?;
                    self.graph = Some(graph);
                    return Ok(Path::Captured);
                }
                Err(why) => self.turn_off(why),
            }
        }
        body(&mut Issuer::direct(stream)).map_err(|e| match e {
            Issue::Failed(e) => e,
            Issue::Changed => "a direct step cannot change".into(),
        })?;
        Ok(Path::Direct)
    }

    /// Issues this cache's later steps directly, saying why (once a process).
    fn turn_off(&mut self, why: String) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("note: decoding steps are issued without a CUDA graph: {why}"));
        self.off = Some(why);
    }
}

/// `body` captured from `stream` and instantiated. The capture is ended whatever happens, so
/// the stream is usable after an error.
fn capture<F>(stream: cu::CUstream, body: &F) -> Result<Graph, String>
where
    F: Fn(&mut Issuer<'_>) -> Result<(), Issue>,
{
    let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
    // SAFETY: a live stream of the current context, not already capturing.
    unsafe { cu::cuStreamBeginCapture_v2(stream, mode) }
        .result()
        .map_err(|e| format!("cuStreamBeginCapture: {e}"))?;
    let mut is = Issuer {
        stream,
        how: How::Capture(Vec::new()),
        timeline: None,
    };
    let issued = body(&mut is);
    let mut graph = std::ptr::null_mut();
    // SAFETY: ends the capture begun above; `graph` receives a new graph or null.
    let ended = unsafe { cu::cuStreamEndCapture(stream, &mut graph) }.result();
    if !graph.is_null() && (issued.is_err() || ended.is_err()) {
        // SAFETY: the graph the capture made, used nowhere else.
        unsafe { cu::cuGraphDestroy(graph) };
    }
    match issued {
        Err(Issue::Failed(e)) => return Err(e),
        Err(Issue::Changed) => return Err("a captured step cannot change".into()),
        Ok(()) => {}
    }
    ended.map_err(|e| format!("cuStreamEndCapture: {e}"))?;
    let How::Capture(ops) = is.how else {
        unreachable!("a capture's issuer stays one")
    };
    let mut exec = std::ptr::null_mut();
    // SAFETY: a complete graph of this context; `exec` receives its instance.
    let made = unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result();
    if let Err(e) = made {
        // SAFETY: as above.
        unsafe { cu::cuGraphDestroy(graph) };
        return Err(format!("cuGraphInstantiate: {e}"));
    }
    Ok(Graph { graph, exec, ops })
}

fn launch(exec: cu::CUgraphExec, stream: cu::CUstream) -> Result<(), String> {
    // SAFETY: a live instance of a graph whose buffers the caller holds, on a live stream.
    unsafe { cu::cuGraphLaunch(exec, stream) }
        .result()
        .map_err(|e| format!("cuGraphLaunch: {e}"))
}

/// The node the capture on `stream` added last: what the next launch would depend on.
fn last_node(stream: cu::CUstream) -> Result<cu::CUgraphNode, String> {
    let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let (mut id, mut graph) = (0, std::ptr::null_mut());
    let (mut deps, mut n): (*const cu::CUgraphNode, usize) = (std::ptr::null(), 0);
    // SAFETY: a stream under capture; the out-pointers are valid for their types (edge data,
    // optional, is not asked for).
    unsafe {
        cu::cuStreamGetCaptureInfo_v3(
            stream,
            &mut status,
            &mut id,
            &mut graph,
            &mut deps,
            std::ptr::null_mut(),
            &mut n,
        )
    }
    .result()
    .map_err(|e| format!("cuStreamGetCaptureInfo: {e}"))?;
    if n != 1 || deps.is_null() {
        return Err(format!("the capture's last launch has {n} nodes, not 1"));
    }
    // SAFETY: `deps` points at `n` = 1 nodes, valid until the next call on this stream.
    Ok(unsafe { *deps })
}

/// Sets a kernel node of `exec` to launch `function` with `how` and the argument `slots`.
fn set_params(
    exec: cu::CUgraphExec,
    node: cu::CUgraphNode,
    function: usize,
    how: Launch,
    slots: &mut [u64],
) -> Result<(), String> {
    let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
    let p = cu::CUDA_KERNEL_NODE_PARAMS {
        func: function as cu::CUfunction,
        gridDimX: how.grid.0,
        gridDimY: how.grid.1,
        gridDimZ: how.grid.2,
        blockDimX: how.threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: how.dynamic_smem,
        kernelParams: params.as_mut_ptr(),
        extra: std::ptr::null_mut(),
        kern: std::ptr::null_mut(),
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: `node` is a kernel node of the graph `exec` was made from, of the same
    // function; each slot holds an argument as `launch_function` passes it, and the driver
    // copies them before returning.
    unsafe { cu::cuGraphExecKernelNodeSetParams_v2(exec, node, &p) }
        .result()
        .map_err(|e| format!("cuGraphExecKernelNodeSetParams: {e}"))
}
