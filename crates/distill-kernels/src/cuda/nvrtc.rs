//! CUDA C kernels compiled at run time: NVRTC (which cubecl already loads) compiles a source
//! once per process and configuration, each device loads the module once, and [`launch`]
//! issues a kernel on the stream [`stream::run_on_stream`] hands out.
//!
//! [`stream::run_on_stream`]: super::stream::run_on_stream

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys as cu;
use cudarc::nvrtc::CompileOptions;

/// Helpers the elementwise kernels share: `bf16_t`, `i64`, `to_bf16` (round to nearest even,
/// NaN kept), `load` and `store` (an f32 value from or into a bf16 or f32 buffer, by the flag
/// [`dtype_flag`] gives).
pub(crate) const BF16_STORE: &str = r#"
typedef unsigned short bf16_t;
typedef long long i64;

__device__ __forceinline__ bf16_t to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ void store(void* out, int bf16, i64 i, float v) {
    if (bf16) ((bf16_t*)out)[i] = to_bf16(v); else ((float*)out)[i] = v;
}

__device__ __forceinline__ float load(const void* z, int bf16, i64 i) {
    return bf16 ? __uint_as_float(((unsigned int)((const bf16_t*)z)[i]) << 16) : ((const float*)z)[i];
}
"#;

/// The `bf16` flag of [`BF16_STORE`]'s `load` and `store` for a tensor of dtype `d`.
pub(crate) fn dtype_flag(d: burn::tensor::DType, what: &str) -> Result<i32, String> {
    use burn::tensor::DType;
    match d {
        DType::BF16 => Ok(1),
        DType::F32 => Ok(0),
        other => Err(format!("{what} is {other:?}; the kernels take bf16 or f32")),
    }
}

/// One compiled source: what [`functions`] needs to build and load it.
pub(crate) struct Module {
    /// Names this configuration in the caches (source and defines).
    pub key: String,
    /// CUDA C, compiled as one text in this order (e.g. [`BF16_STORE`] first).
    pub sources: &'static [&'static str],
    /// e.g. `compute_80` for tensor-core instructions; None: NVRTC's default.
    pub arch: Option<&'static str>,
    /// `-D` defines and other NVRTC options.
    pub options: Vec<String>,
    pub names: &'static [&'static str],
    /// Dynamic shared memory the kernels may ask for, in bytes (over 48 KiB needs an opt-in).
    pub dynamic_smem: u32,
}

type Loaded = HashMap<(String, usize), Result<Vec<usize>, String>>;
static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();

/// Makes sure `module` is loaded on `device` before kernels of it are queued: loads it through
/// a blocking call the first time, so that a failure (no NVRTC, a GPU older than `arch`)
/// comes back here as an error the caller can fall back on, not inside queued work, where
/// [`stream::run_on_stream`] can only record it on cubecl's stream: the caller's next sync or
/// read then fails.
///
/// [`stream::run_on_stream`]: super::stream::run_on_stream
pub(crate) fn ensure_loaded(device: &burn::backend::cuda::CudaDevice, module: Module) -> Result<(), String> {
    if let Some(found) = lock(&LOADED).get(&(module.key.clone(), device.index)) {
        return found.clone().map(|_| ());
    }
    let index = device.index;
    super::stream::run_on_stream(device, [], super::stream::Ordering::Sync, move |_, []| {
        functions(index, &module).map(|_| ())
    })
}

/// The kernels of `module` on `device`, as `CUfunction` addresses in `module.names` order.
/// Runs on the device thread, where the device's context is current. Errors (no NVRTC, a GPU
/// older than `arch`) are kept, so a caller falls back once and is not retried.
pub(crate) fn functions(device: usize, module: &Module) -> Result<Vec<usize>, String> {
    static PTX: OnceLock<Mutex<HashMap<String, Result<CString, String>>>> = OnceLock::new();
    let mut loaded = lock(&LOADED);
    if let Some(found) = loaded.get(&(module.key.clone(), device)) {
        return found.clone();
    }
    let ptx = lock(&PTX)
        .entry(module.key.clone())
        .or_insert_with(|| compile(module))
        .clone();
    let result = ptx.and_then(|ptx| load(&ptx, module));
    loaded.insert((module.key.clone(), device), result.clone());
    result
}

fn lock<T: Default>(m: &'static OnceLock<Mutex<T>>) -> std::sync::MutexGuard<'static, T> {
    m.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn compile(module: &Module) -> Result<CString, String> {
    let opts = CompileOptions {
        arch: module.arch,
        options: module.options.clone(),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.sources.concat(), opts)
        .map_err(|e| format!("NVRTC ({}): {e:?}", module.key))?;
    CString::new(ptx.to_src()).map_err(|e| format!("PTX text: {e}"))
}

fn load(ptx: &CString, module: &Module) -> Result<Vec<usize>, String> {
    // SAFETY: a NUL-terminated PTX image; the context is current on this thread.
    let handle = unsafe { cudarc::driver::result::module::load_data(ptx.as_ptr().cast()) }
        .map_err(|e| format!("cuModuleLoadData ({}): {e}", module.key))?;
    module
        .names
        .iter()
        .map(|name| {
            // SAFETY: `handle` was just loaded and is never unloaded.
            let f =
                unsafe { cudarc::driver::result::module::get_function(handle, CString::new(*name).unwrap()) }
                    .map_err(|e| format!("cuModuleGetFunction({name}): {e}"))?;
            if module.dynamic_smem > 48 << 10 {
                // SAFETY: a function of the module just loaded.
                unsafe {
                    cudarc::driver::result::function::set_function_attribute(
                        f,
                        cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        module.dynamic_smem as i32,
                    )
                }
                .map_err(|e| format!("{name}: {} bytes of shared memory: {e}", module.dynamic_smem))?;
            }
            Ok(f as usize)
        })
        .collect()
}

/// How the kernels are ordered against cubecl's work: on its stream unless the user asked for
/// host syncs (`DISTILL_CUBLAS=sync`); `DISTILL_CUBLAS=off` only concerns the GEMMs.
pub(crate) fn ordering() -> super::stream::Ordering {
    use super::stream::Ordering;
    match super::stream::ordering() {
        Ordering::Sync => Ordering::Sync,
        _ => Ordering::Stream,
    }
}

/// One kernel argument by value, as the kernel declares it.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    /// A device pointer (or null).
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    /// A struct passed by value: the address of its bytes, laid out as the kernel declares
    /// it (`#[repr(C)]`), alive until [`launch`] returns.
    Struct(*const c_void),
}

/// How a kernel is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub dynamic_smem: u32,
}

impl Launch {
    /// 256-thread blocks for a grid-stride loop over `n` elements, at most 65,536 of them.
    pub(crate) fn grid_stride(n: usize) -> Self {
        Launch {
            grid: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            threads: 256,
            dynamic_smem: 0,
        }
    }
}

/// One launch of a kernel, ready to issue: what a kernel module's call builder gives, so that
/// a tensor op and a caller issuing many launches in one go ([`super::decode`]) pass the
/// same arguments.
pub(crate) struct Call {
    pub name: &'static str,
    pub how: Launch,
    pub args: Vec<Arg>,
}

impl Call {
    /// Issues this call on `stream` (from the device thread).
    pub(crate) fn launch(&self, device: usize, module: &Module, stream: cu::CUstream) -> Result<(), String> {
        launch(device, module, self.name, self.how, stream, &self.args)
    }

    /// This call's kernel among `module`'s, looked up as `functions` (in `module.names`
    /// order).
    pub(crate) fn function(&self, module: &Module, functions: &[usize]) -> Result<usize, String> {
        let index = module.names.iter().position(|n| *n == self.name);
        index
            .and_then(|i| functions.get(i).copied())
            .ok_or_else(|| format!("{}: not among the kernels of module {}", self.name, module.key))
    }
}

/// Launches kernel `name` of `module` on `stream`; errors start with the kernel's name. A name
/// missing from `module.names` is an error here, not an index out of bounds on cubecl's device
/// thread. Each scalar argument sits in its own 8-byte slot, little-endian, so a 4-byte one
/// is the slot's first 4 bytes; cuLaunchKernel reads each argument's size from the kernel's
/// signature and copies it before returning.
pub(crate) fn launch(
    device: usize,
    module: &Module,
    name: &str,
    how: Launch,
    stream: cu::CUstream,
    args: &[Arg],
) -> Result<(), String> {
    launch_function(function(device, module, name)?, name, how, stream, args)
}

/// [`launch`] of a kernel already looked up ([`function`]): what a caller issuing many launches
/// in one go uses, to look each kernel up once.
pub(crate) fn launch_function(
    function: usize,
    name: &str,
    how: Launch,
    stream: cu::CUstream,
    args: &[Arg],
) -> Result<(), String> {
    let mut slots: Vec<u64> = args.iter().map(|a| slot(*a)).collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .zip(args)
        .map(|(s, a)| match *a {
            Arg::Struct(p) => p.cast_mut(),
            _ => (s as *mut u64).cast(),
        })
        .collect();
    // SAFETY: `args` follow the kernel's parameter list in order and type (the callers);
    // the pointers are live cubecl buffers of the sizes the shapes describe, held by
    // `run_on_stream` until after the launch.
    unsafe {
        cudarc::driver::result::launch_kernel(
            function as cu::CUfunction,
            how.grid,
            (how.threads, 1, 1),
            how.dynamic_smem,
            stream,
            &mut params,
        )
    }
    .map_err(|e| format!("{name}: launch: {e}"))
}

/// An argument's 8-byte slot: the value, little-endian (a struct's is unused: it is passed
/// by its address).
fn slot(a: Arg) -> u64 {
    match a {
        Arg::Ptr(p) => p,
        Arg::I64(v) => v as u64,
        Arg::I32(v) => u64::from(v as u32),
        Arg::F32(v) => u64::from(v.to_bits()),
        Arg::Struct(_) => 0,
    }
}

/// The arguments' slots as [`launch_function`] passes them, or None if one is a struct
/// (whose bytes a slot does not hold): what a CUDA graph's kernel node is set from.
pub(crate) fn slots(args: &[Arg]) -> Option<Vec<u64>> {
    args.iter()
        .map(|&a| (!matches!(a, Arg::Struct(_))).then(|| slot(a)))
        .collect()
}

/// Kernel `name` of `module` on `device`, as a `CUfunction` address.
pub(crate) fn function(device: usize, module: &Module, name: &str) -> Result<usize, String> {
    let index = module.names.iter().position(|n| *n == name).ok_or_else(|| {
        format!(
            "{name}: not among the kernels of module {} ({:?})",
            module.key, module.names
        )
    })?;
    Ok(functions(device, module)?[index])
}
