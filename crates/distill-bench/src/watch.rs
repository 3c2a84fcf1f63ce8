//! Peak memory of a case process, and the CUDA memory pools' figures.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::Device;
use crate::rows::GIB;

/// What a case process measured.
pub(crate) struct Memory {
    pub(crate) peak_gib: Option<f64>,
    pub(crate) method: &'static str,
    pub(crate) device: String,
}

/// Peak memory of this process's case. CUDA: `nvidia-smi` polled every 20 ms in a child
/// process, the device's memory.used minus what it was before the case touched the GPU (so
/// the CUDA context counts, as it does on a user's card). CPU: the process's peak resident
/// set (VmHWM, reset at the start).
pub(crate) enum MemWatch {
    Smi {
        baseline_mib: f64,
        max_mib: Arc<Mutex<f64>>,
        poller: std::process::Child,
        reader: std::thread::JoinHandle<()>,
        index: usize,
        name: String,
    },
    Cuda(usize),
    Cpu,
}

impl MemWatch {
    pub(crate) fn start(device: Device) -> MemWatch {
        match device {
            Device::Cpu => {
                // Writing 5 resets the peak RSS (Linux >= 4.0); where not, VmHWM is since start.
                let _ = std::fs::write("/proc/self/clear_refs", "5");
                MemWatch::Cpu
            }
            Device::Cuda(index) => Self::start_smi(index).unwrap_or(MemWatch::Cuda(index)),
        }
    }

    fn start_smi(index: usize) -> Option<MemWatch> {
        let query = |field: &str| -> Option<String> {
            let out = Command::new("nvidia-smi")
                .args([
                    &format!("--query-gpu={field}"),
                    "--format=csv,noheader,nounits",
                    "-i",
                    &index.to_string(),
                ])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let baseline_mib: f64 = query("memory.used")?.parse().ok()?;
        let name = query("name").unwrap_or_default();
        let mut poller = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                &index.to_string(),
                "-lms",
                "20",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let max_mib = Arc::new(Mutex::new(baseline_mib));
        let stdout = poller.stdout.take()?;
        let sink = max_mib.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = line.trim().parse::<f64>() {
                    let mut m = sink.lock().unwrap_or_else(|e| e.into_inner());
                    *m = m.max(v);
                }
            }
        });
        Some(MemWatch::Smi {
            baseline_mib,
            max_mib,
            poller,
            reader,
            index,
            name,
        })
    }

    pub(crate) fn finish(self) -> Memory {
        match self {
            MemWatch::Smi {
                baseline_mib,
                max_mib,
                mut poller,
                reader,
                index,
                name,
            } => {
                // Let the poller see the last allocations before it stops.
                std::thread::sleep(std::time::Duration::from_millis(60));
                let _ = poller.kill();
                let _ = poller.wait();
                let _ = reader.join();
                let max = *max_mib.lock().unwrap_or_else(|e| e.into_inner());
                Memory {
                    peak_gib: Some((max - baseline_mib).max(0.0) * 1024.0 * 1024.0 / GIB),
                    method: "nvidia-smi memory.used peak - baseline (20 ms polling)",
                    device: format!("cuda:{index} {name}"),
                }
            }
            MemWatch::Cuda(index) => Memory {
                peak_gib: None,
                method: "none (nvidia-smi unavailable; see pool_gib)",
                device: format!("cuda:{index}"),
            },
            MemWatch::Cpu => Memory {
                peak_gib: vm_hwm_bytes().map(|b| b as f64 / GIB),
                method: "VmHWM (process peak RSS)",
                device: "cpu".into(),
            },
        }
    }
}

fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of cubecl's memory pools on the CUDA device (this thread's stream): (in use,
/// reserved).
#[cfg(feature = "cuda")]
pub(crate) fn pool_bytes(device: Device) -> Option<(u64, u64)> {
    use burn::cubecl::Runtime;
    use burn::cubecl::cuda::CudaRuntime;
    match device {
        Device::Cuda(n) => {
            let client = CudaRuntime::client(&burn::backend::cuda::CudaDevice::new(n));
            client
                .memory_usage()
                .ok()
                .map(|u| (u.bytes_in_use, u.bytes_reserved))
        }
        Device::Cpu => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn pool_bytes(_device: Device) -> Option<(u64, u64)> {
    None
}

/// The CUDA driver pool's (handed out, reserved) high-water marks for this process, in bytes:
/// with nvidia-smi's peak they split the peak into cubecl's buffers, the pool's slack and the
/// rest (context, module code, cuBLAS workspaces).
#[cfg(feature = "cuda")]
pub(crate) fn driver_pool_peaks(device: Device, reset: bool) -> Option<(u64, u64)> {
    match device {
        Device::Cuda(n) => {
            distill_kernels::cuda::pool::driver_pool_peaks(&burn::backend::cuda::CudaDevice::new(n), reset)
                .map_err(|e| eprintln!("note: no driver pool figures ({e})"))
                .ok()
        }
        Device::Cpu => None,
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn driver_pool_peaks(_device: Device, _reset: bool) -> Option<(u64, u64)> {
    None
}
