//! The GPU context: driver initialisation, kernel compilation (NVRTC, cached on
//! disk per GPU architecture), device buffers and checked launches.
//!
//! Raw driver-API calls through cudarc's `result` layer: buffers are plain
//! device pointers owned by `DevBuf` (freed on drop), every call's status is
//! checked, and every launch is followed by a launch-error check. All work is
//! queued on one stream; `sync()` waits for it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;

use cudarc::driver::{result as cu, sys};
use cudarc::nvrtc::{result as nvrtc, sys as nvsys};
use sha1::{Digest, Sha1};

use crate::error::{CudaError, Result};

const SOURCES: [(&str, &str); 6] = [
    ("matvec.cu", include_str!("kernels/matvec.cu")),
    ("mmvq.cu", include_str!("kernels/mmvq.cu")),
    ("hc.cu", include_str!("kernels/hc.cu")),
    ("attn.cu", include_str!("kernels/attn.cu")),
    ("moe.cu", include_str!("kernels/moe.cu")),
    ("synth.cu", include_str!("kernels/synth.cu")),
];

fn drv(what: &str) -> impl FnOnce(cu::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

/// An owned device allocation.
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn f32_at(&self, i: usize) -> u64 {
        self.ptr + (i * 4) as u64
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // Errors at free time cannot be reported usefully; the context may be gone.
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
    }
}

pub struct Gpu {
    pub name: String,
    pub cc: (i32, i32),
    pub total_mem: usize,
    /// streaming multiprocessors
    pub sms: u32,
    ctx: sys::CUcontext,
    /// main stream (index 0) and side streams for independent branches
    pub stream: sys::CUstream,
    side: Vec<sys::CUstream>,
    cur: std::cell::Cell<usize>,
    events: Vec<sys::CUevent>,
    next_event: std::cell::Cell<usize>,
    module: sys::CUmodule,
    funcs: std::cell::RefCell<HashMap<String, sys::CUfunction>>,
    pub allocated: std::cell::Cell<usize>,
    capturing: std::cell::Cell<bool>,
    /// per-kernel (seconds, launches) when profiling (synchronises every launch)
    pub profile: std::cell::RefCell<Option<HashMap<String, (f64, u64)>>>,
    /// launch kernels with programmatic dependent launch (sm_90+; env
    /// DSV4_PDL=0 turns it off)
    pub pdl: bool,
    /// kernels skipped at launch (env DSV4_ABLATE=name,name: a timing
    /// experiment only, the results are wrong; see docs/perf.md)
    ablate: Vec<String>,
    /// per kernel: dynamic shared memory a launch may use without raising the
    /// function's limit
    shmem_limit: std::cell::RefCell<HashMap<String, u32>>,
    /// `resident_blocks` answers
    resident: std::cell::RefCell<HashMap<String, u32>>,
    /// Streams (bit i: stream index i, 0 main) whose kernels launch at the
    /// greatest priority `hi_prio` (`set_high_priority`: the block scheduler
    /// dispatches their blocks first as slots free up; captured graphs keep
    /// them as node priorities)
    prio_mask: std::cell::Cell<u32>,
    hi_prio: i32,
}

// The context is made current on whichever thread uses the Gpu (see `bind`);
// the engine uses a backend from one thread at a time.
unsafe impl Send for Gpu {}

/// Is a CUDA driver (and NVRTC) loadable on this machine, with a device?
pub fn probe() -> std::result::Result<(), String> {
    unsafe {
        if !sys::is_culib_present() {
            return Err("the CUDA driver library (libcuda) was not found".into());
        }
        if !nvsys::is_culib_present() {
            return Err("NVRTC (libnvrtc) was not found".into());
        }
    }
    cu::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let n = cu::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if n < 1 {
        return Err("no CUDA device".into());
    }
    Ok(())
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe().map_err(CudaError::Unavailable)?;
        let dev = cu::device::get(ordinal as i32).map_err(drv("cuDeviceGet"))?;
        let name = cu::device::get_name(dev).map_err(drv("cuDeviceGetName"))?;
        let total_mem = unsafe { cu::device::total_mem(dev) }.map_err(drv("cuDeviceTotalMem"))?;
        let major = unsafe { cu::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) }
            .map_err(drv("attribute"))?;
        let minor = unsafe { cu::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) }
            .map_err(drv("attribute"))?;
        let sms = unsafe { cu::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) }.map_err(drv("attribute"))?.max(1) as u32;
        let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(drv("cuDevicePrimaryCtxRetain"))?;
        unsafe { cu::ctx::set_current(ctx) }.map_err(drv("cuCtxSetCurrent"))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(drv("cuStreamCreate"))?;
        let side = (0..4)
            .map(|_| cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(drv("cuStreamCreate")))
            .collect::<Result<Vec<_>>>()?;
        let events = (0..64)
            .map(|_| cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(drv("cuEventCreate")))
            .collect::<Result<Vec<_>>>()?;
        let (mut least, mut hi_prio) = (0i32, 0i32);
        unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut hi_prio) }.result().map_err(drv("cuCtxGetStreamPriorityRange"))?;
        let prio_mask = 0u32.into();
        let cubin = compile((major, minor))?;
        let ablate = std::env::var("DSV4_ABLATE").map(|v| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect()).unwrap_or_default();
        let module = unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(drv("cuModuleLoadData"))?;
        Ok(Gpu { name, cc: (major, minor), total_mem, sms, ctx, stream, side, cur: 0.into(), events, next_event: 0.into(), module, funcs: Default::default(), allocated: 0.into(), capturing: false.into(), profile: Default::default(), pdl: major >= 9 && std::env::var("DSV4_PDL").map(|v| v != "0").unwrap_or(true), ablate, shmem_limit: Default::default(), resident: Default::default(), prio_mask, hi_prio })
    }

    /// Index of the stream work is queued on now: 0 = main, i = side stream i.
    /// Launch the kernels of these streams (0 main, 1.. side) at the
    /// greatest stream priority from now on.
    pub fn set_high_priority(&self, streams: &[usize]) {
        self.prio_mask.set(streams.iter().filter(|&&i| i <= self.side.len()).fold(0, |m, &i| m | 1 << i));
    }

    pub fn cur_index(&self) -> usize {
        self.cur.get()
    }
    /// The stream work is queued on now (main unless inside `on_side`).
    pub fn cur_stream(&self) -> sys::CUstream {
        match self.cur.get() {
            0 => self.stream,
            i => self.side[i - 1],
        }
    }

    fn event(&self) -> sys::CUevent {
        let i = self.next_event.get();
        self.next_event.set((i + 1) % self.events.len());
        self.events[i]
    }

    /// Run `f` with its work queued on side stream `i` (1..=3): the side
    /// stream first waits for everything queued on the main stream so far; the
    /// returned join token makes the main stream wait for the side work. Inside
    /// a graph capture this becomes parallel branches of the graph.
    pub fn on_side<T>(&self, i: usize, f: impl FnOnce() -> Result<T>) -> Result<(T, Join)> {
        let side = self.side[i - 1];
        let ev = self.event();
        unsafe {
            cu::event::record(ev, self.stream).map_err(drv("cuEventRecord"))?;
            cu::stream::wait_event(side, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).map_err(drv("cuStreamWaitEvent"))?;
        }
        let prev = self.cur.replace(i);
        let r = f();
        self.cur.set(prev);
        let v = r?;
        let done = self.event();
        unsafe { cu::event::record(done, side) }.map_err(drv("cuEventRecord"))?;
        Ok((v, Join { ev: done }))
    }

    /// The stream work is queued on now waits for a side branch.
    pub fn wait_on_current(&self, j: &Join) -> Result<()> {
        unsafe { cu::stream::wait_event(self.cur_stream(), j.ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.map_err(drv("cuStreamWaitEvent"))
    }

    /// Main stream waits for a side branch.
    pub fn join(&self, j: Join) -> Result<()> {
        unsafe { cu::stream::wait_event(self.stream, j.ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.map_err(drv("cuStreamWaitEvent"))
    }

    pub fn bind(&self) -> Result<()> {
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(drv("cuCtxSetCurrent"))
    }

    pub fn func(&self, name: &str) -> Result<sys::CUfunction> {
        if let Some(&f) = self.funcs.borrow().get(name) {
            return Ok(f);
        }
        let c = CString::new(name).map_err(|_| CudaError::Driver("bad kernel name".into()))?;
        let f = unsafe { cu::module::get_function(self.module, c) }.map_err(|e| CudaError::Driver(format!("kernel `{name}`: {e:?}")))?;
        self.funcs.borrow_mut().insert(name.to_string(), f);
        Ok(f)
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let bytes = bytes.max(4);
        // 16 spare bytes: kernels may read whole aligned words that straddle
        // the end of a matrix (Q8_0's 34-byte blocks, see mmvq.cu)
        match unsafe { cu::malloc_sync(bytes + 16) } {
            Ok(ptr) => {
                self.allocated.set(self.allocated.get() + bytes);
                Ok(DevBuf { ptr, bytes })
            }
            Err(e) => {
                let (free, total) = cu::mem_get_info().unwrap_or((0, 0));
                Err(CudaError::OutOfMemory { asked: bytes, free, total, detail: format!("{e:?}") })
            }
        }
    }

    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DevBuf> {
        let b = self.alloc(bytes)?;
        unsafe { cu::memset_d8_async(b.ptr, 0, b.bytes, self.stream) }.map_err(drv("cuMemsetD8"))?;
        Ok(b)
    }

    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DevBuf> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = self.alloc(bytes.len())?;
        self.write(&b, 0, bytes)?;
        Ok(b)
    }

    /// Synchronous host → device copy at a byte offset.
    pub fn write(&self, b: &DevBuf, offset: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if offset + bytes.len() > b.bytes {
            return Err(CudaError::Driver(format!("write of {} bytes at {offset} past a {}-byte buffer", bytes.len(), b.bytes)));
        }
        unsafe { cu::memcpy_htod_async(b.ptr + offset as u64, bytes, self.stream) }.map_err(drv("cuMemcpyHtoD"))?;
        self.sync()
    }

    pub fn write_f32(&self, b: &DevBuf, offset_elems: usize, v: &[f32]) -> Result<()> {
        self.write(b, offset_elems * 4, bytemuck::cast_slice(v))
    }

    pub fn write_i32(&self, b: &DevBuf, offset_elems: usize, v: &[i32]) -> Result<()> {
        self.write(b, offset_elems * 4, bytemuck::cast_slice(v))
    }

    pub fn read_f32(&self, ptr: u64, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; n];
        self.sync()?;
        if n > 0 {
            unsafe { cu::memcpy_dtoh_async(&mut out[..], ptr, self.stream) }.map_err(drv("cuMemcpyDtoH"))?;
        }
        self.sync()?;
        Ok(out)
    }

    pub fn read_i32(&self, ptr: u64, n: usize) -> Result<Vec<i32>> {
        let mut out = vec![0i32; n];
        self.sync()?;
        if n > 0 {
            unsafe { cu::memcpy_dtoh_async(&mut out[..], ptr, self.stream) }.map_err(drv("cuMemcpyDtoH"))?;
        }
        self.sync()?;
        Ok(out)
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.cur_stream()) }.map_err(drv("cuMemcpyDtoD"))
    }

    pub fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        unsafe { cu::memset_d8_async(ptr, byte, bytes, self.cur_stream()) }.map_err(drv("cuMemsetD8"))
    }

    pub fn sync(&self) -> Result<()> {
        unsafe { cu::stream::synchronize(self.stream) }.map_err(drv("cuStreamSynchronize (a kernel failed)"))
    }

    /// Blocks of kernel `name` (`block` threads, `smem` dynamic shared bytes)
    /// that fit on the whole GPU at once: the grid of a persistent kernel.
    pub fn resident_blocks(&self, name: &str, block: u32, smem: u32) -> Result<u32> {
        let key = format!("{name}/{block}/{smem}");
        if let Some(&n) = self.resident.borrow().get(&key) {
            return Ok(n);
        }
        let f = self.func(name)?;
        if smem > 48 * 1024 {
            unsafe { cu::function::set_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32) }
                .map_err(drv("cuFuncSetAttribute"))?;
        }
        let per = unsafe { cu::occupancy::max_active_block_per_multiprocessor(f, block as i32, smem as usize) }.map_err(drv("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        let n = self.sms * per.max(1) as u32;
        self.resident.borrow_mut().insert(key, n);
        Ok(n)
    }

    /// Timeline tracing (env DSV4_TRACE=1 at start-up compiles it in):
    /// forget what was recorded so far.
    pub fn trace_reset(&self) -> Result<()> {
        let (n, _) = unsafe { cu::module::get_global(self.module, std::ffi::CString::new("dsv4_trace_n").unwrap()) }
            .map_err(|_| CudaError::Unsupported("tracing is not compiled in (DSV4_TRACE=1)".into()))?;
        self.sync()?;
        unsafe { cu::memset_d8_async(n, 0, 4, self.stream) }.map_err(drv("cuMemsetD8"))?;
        self.sync()
    }

    /// The launches recorded since `trace_reset`, in the order their waits
    /// returned: (kernel name, start, wait returned, end) in ns of the GPU's
    /// global timer. Names are those launched through this Gpu.
    pub fn trace_read(&self) -> Result<Vec<(String, u64, u64, u64)>> {
        let get = |name: &str| unsafe { cu::module::get_global(self.module, std::ffi::CString::new(name).unwrap()) }
            .map_err(|_| CudaError::Unsupported("tracing is not compiled in (DSV4_TRACE=1)".into()));
        let ((n, _), (buf, bytes)) = (get("dsv4_trace_n")?, get("dsv4_trace")?);
        self.sync()?;
        let count = self.read_i32(n, 1)?[0] as usize;
        let count = count.min(bytes / 32);
        let mut raw = vec![0u64; 4 * count];
        if count > 0 {
            unsafe { cu::memcpy_dtoh_async(&mut raw[..], buf, self.stream) }.map_err(drv("cuMemcpyDtoH"))?;
        }
        self.sync()?;
        let names: HashMap<u32, String> = self.funcs.borrow().keys().map(|k| (fnv1a(k), k.clone())).collect();
        Ok(raw
            .chunks(4)
            .map(|r| {
                let h = r[0] as u32;
                let name = match names.get(&h) {
                    Some(n) => n.clone(),
                    None if h >> 24 == 0xAB => format!("mark{}", h & 0xffffff),
                    None => format!("?{h:08x}"),
                };
                (name, r[1], r[2], r[3])
            })
            .collect())
    }

    /// Launch `name` with `params` (pointers to each argument value, in order).
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shmem: u32, params: &mut [*mut c_void]) -> Result<()> {
        if !self.ablate.is_empty() && self.ablate.iter().any(|a| a == name) {
            return Ok(());
        }
        let f = self.func(name)?;
        // The 48 KB default limit covers static + dynamic shared memory: raise
        // the function's dynamic limit whenever a launch asks for more than it
        // was last allowed beyond what its static part leaves (once per size).
        if shmem > 0 {
            let mut lim = self.shmem_limit.borrow_mut();
            let allowed = *lim.entry(name.to_string()).or_insert_with(|| {
                let stat = unsafe { cu::function::get_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES) }.unwrap_or(0);
                (48 * 1024 - stat.max(0)).max(0) as u32
            });
            if shmem > allowed {
                unsafe {
                    cu::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        shmem as i32,
                    )
                }
                .map_err(drv("cuFuncSetAttribute"))?;
                lim.insert(name.to_string(), shmem);
            }
        }
        let profiling = !self.capturing.get() && self.profile.borrow().is_some();
        // profiling: GPU time between events recorded around the launch (the
        // host launch overhead is not counted)
        let evs = if profiling {
            self.sync()?;
            let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
            let (a, b) = (cu::event::create(flags).map_err(drv("cuEventCreate"))?, cu::event::create(flags).map_err(drv("cuEventCreate"))?);
            unsafe { cu::event::record(a, self.cur_stream()) }.map_err(drv("cuEventRecord"))?;
            Some((a, b))
        } else {
            None
        };
        let prio = self.prio_mask.get() >> self.cur.get() & 1 == 1;
        if self.pdl || prio {
            // programmatic dependent launch: this kernel may be scheduled while
            // the previous one in the stream drains; its prologue waits
            let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
            let mut na = 0;
            if self.pdl {
                attrs[na].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attrs[na].value.programmaticStreamSerializationAllowed = 1;
                na += 1;
            }
            if prio {
                attrs[na].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY;
                attrs[na].value.priority = self.hi_prio;
                na += 1;
            }
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: shmem,
                hStream: self.cur_stream(),
                attrs: attrs.as_mut_ptr(),
                numAttrs: na as u32,
            };
            unsafe { sys::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()) }
                .result()
                .map_err(|e| CudaError::Driver(format!("launch of `{name}` grid {grid:?} block {block:?}: {e:?}")))?;
        } else {
            unsafe { cu::launch_kernel(f, grid, block, shmem, self.cur_stream(), params) }
                .map_err(|e| CudaError::Driver(format!("launch of `{name}` grid {grid:?} block {block:?}: {e:?}")))?;
        }
        if let Some((a, b)) = evs {
            unsafe { cu::event::record(b, self.cur_stream()) }.map_err(drv("cuEventRecord"))?;
            unsafe { cu::stream::synchronize(self.cur_stream()) }.map_err(drv("cuStreamSynchronize (a kernel failed)"))?;
            let ms = unsafe { cu::event::elapsed(a, b) }.map_err(drv("cuEventElapsedTime"))?;
            unsafe {
                let _ = cu::event::destroy(a);
                let _ = cu::event::destroy(b);
            }
            let dt = ms as f64 * 1e-3;
            if let Some(p) = self.profile.borrow_mut().as_mut() {
                let e = p.entry(name.to_string()).or_insert((0.0, 0));
                e.0 += dt;
                e.1 += 1;
            }
        }
        if !self.capturing.get() && std::env::var_os("DSV4_CUDA_SYNC").is_some() {
            self.sync().map_err(|e| CudaError::Driver(format!("after `{name}`: {e}")))?;
        }
        Ok(())
    }
}

/// A side branch to wait for (see `Gpu::on_side`).
#[must_use]
pub struct Join {
    ev: sys::CUevent,
}

/// An instantiated CUDA graph (destroyed on drop).
pub struct Graph {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
}

// Graph handles belong to the Gpu's context, used from one thread at a time.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = cu::graph::exec_destroy(self.exec);
            let _ = cu::graph::destroy(self.graph);
        }
    }
}

impl Gpu {
    pub fn begin_capture(&self) -> Result<()> {
        unsafe { cu::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) }
            .map_err(drv("cuStreamBeginCapture"))?;
        self.capturing.set(true);
        Ok(())
    }
    pub fn end_capture(&self) -> Result<Graph> {
        self.capturing.set(false);
        let graph = unsafe { cu::stream::end_capture(self.stream) }.map_err(drv("cuStreamEndCapture"))?;
        let exec = unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY) }.map_err(drv("cuGraphInstantiate"))?;
        Ok(Graph { exec, graph })
    }
    pub fn launch_graph(&self, g: &Graph) -> Result<()> {
        unsafe { cu::graph::launch(g.exec, self.stream) }.map_err(drv("cuGraphLaunch"))
    }
}

/// Launch helper: `launch!(gpu, "kernel", grid, block, shmem; arg, arg, ...)`.
/// The arguments are moved into a tuple so their addresses stay valid for the
/// call; their Rust types must match the kernel's parameter types exactly
/// (device pointers as u64, `int` as i32, `float` as f32, `u64` as u64).
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $name:expr, $grid:expr, $block:expr, $shmem:expr; $($arg:expr),+ $(,)?) => {{
        let mut vals = ($($arg,)+);
        let mut p = $crate::device::ParamPtrs::ptrs(&mut vals);
        $gpu.launch($name, $grid, $block, $shmem, p.as_mut())
    }};
}


/// Tuples of kernel arguments → array of pointers to each element.
pub trait ParamPtrs {
    type Out: AsMut<[*mut c_void]>;
    fn ptrs(&mut self) -> Self::Out;
}

pub fn param_ptrs<T: ParamPtrs>(t: &mut T) -> T::Out {
    t.ptrs()
}

macro_rules! impl_params {
    ($n:expr; $($T:ident $i:tt),*) => {
        impl<$($T),*> ParamPtrs for ($($T,)*) {
            type Out = [*mut c_void; $n];
            fn ptrs(&mut self) -> [*mut c_void; $n] {
                [$(&mut self.$i as *mut $T as *mut c_void),*]
            }
        }
    };
}
impl_params!(1; A 0);
impl_params!(2; A 0, B 1);
impl_params!(3; A 0, B 1, C 2);
impl_params!(4; A 0, B 1, C 2, D 3);
impl_params!(5; A 0, B 1, C 2, D 3, E 4);
impl_params!(6; A 0, B 1, C 2, D 3, E 4, F 5);
impl_params!(7; A 0, B 1, C 2, D 3, E 4, F 5, G 6);
impl_params!(8; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
impl_params!(9; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
impl_params!(10; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
impl_params!(11; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
impl_params!(12; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);
impl_params!(13; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12);
impl_params!(14; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13);
impl_params!(15; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14);
impl_params!(16; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15);
impl_params!(17; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16);
impl_params!(18; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17);
impl_params!(19; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18);
impl_params!(20; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19);
impl_params!(21; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19, U 20);
impl_params!(22; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19, U 20, V 21);
impl_params!(23; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19, U 20, V 21, W 22);
impl_params!(24; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19, U 20, V 21, W 22, X 23);
impl_params!(25; A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11, M 12, N 13, O 14, P 15, Q 16, R 17, S 18, T 19, U 20, V 21, W 22, X 23, Y 24);

/// The full NVRTC source: common header, generated IQ2 tables, kernel families.
pub fn full_source() -> String {
    use dsv4_gguf::quant::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
    let mut s = String::new();
    // build switches for A/B experiments (part of the source, so of the cache key)
    let flag = |k: &str, default: u32| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(default);
    s.push_str(&format!("#define PDL_EARLY {}\n#define DSV4_TRACE {}\n", flag("DSV4_PDL_EARLY", 0), flag("DSV4_TRACE", 0)));
    s.push_str(include_str!("kernels/common.cuh"));
    s.push_str("\n// global (not __constant__): blocks copy them to shared memory with\n// coalesced loads; constant memory would serialise the per-thread indices\n__device__ u64 IQ2XXS_GRID[256] = {");
    for (i, v) in IQ2XXS_GRID.iter().enumerate() {
        if i % 8 == 0 {
            s.push('\n');
        }
        s.push_str(&format!("0x{v:016x}ull,"));
    }
    // selector nibbles of each grid row for mmvq.cu's PRMT decode: value
    // 8 / 25 / 43 -> 0 / 1 / 2
    s.push_str("};\n__device__ u32 IQ2_GSEL[256] = {");
    for v in IQ2XXS_GRID.iter() {
        let mut sel = 0u32;
        for m in 0..8 {
            let b = (v >> (8 * m)) & 0xff;
            sel |= (match b { 8 => 0, 25 => 1, _ => 2 }) << (4 * m);
        }
        s.push_str(&format!("0x{sel:08x}u,"));
    }
    s.push_str("};\n__device__ u8 KSIGNS_IQ2XS[128] = {");
    for v in KSIGNS_IQ2XS.iter() {
        s.push_str(&format!("{v},"));
    }
    s.push_str("};\n");
    for (name, src) in SOURCES {
        s.push_str(&format!("// ---- {name}\n"));
        s.push_str(&with_pdl_prologue(src));
        s.push('\n');
    }
    s
}

/// FNV-1a of a kernel name, as the tracing kernels hash `__func__`.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619))
}

/// Every kernel body starts with `pdl_prologue()` (common.cuh): wait for the
/// previous kernel in the stream to finish (programmatic dependent launch, see
/// `Gpu::launch`), then let the next one be scheduled. Inserted here, after
/// the `{` that opens each `__global__` function, so no kernel can miss it.
fn with_pdl_prologue(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + 1024);
    let mut rest = src;
    while let Some(i) = rest.find("__global__") {
        let Some(j) = rest[i..].find('{') else { break };
        out.push_str(&rest[..i + j + 1]);
        // (PDL_MANUAL in the signature: the kernel calls it itself)
        out.push_str(" TRACE_KERNEL();");
        if !rest[i..i + j].contains("PDL_MANUAL") {
            out.push_str(" pdl_prologue();");
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DSV4_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let home = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("dsv4").join("kernels"))
}

/// Compile (or load from the disk cache) the kernels for compute capability `cc`.
/// Needs only NVRTC, no driver or GPU: `examples/kernel_compile` uses it to
/// check the kernels on a host without CUDA (tools/cuda-compile-check.sh).
pub fn compile(cc: (i32, i32)) -> Result<Vec<u8>> {
    let src = full_source();
    let arch = format!("--gpu-architecture=sm_{}{}", cc.0, cc.1);
    let opts = vec![arch.clone(), "--std=c++17".to_string(), "-default-device".to_string(), "-lineinfo".to_string()];
    let mut h = Sha1::new();
    h.update(src.as_bytes());
    for o in &opts {
        h.update(o.as_bytes());
    }
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join(format!("{key}.cubin")));
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if !b.is_empty() {
                return Ok(b);
            }
        }
    }
    let csrc = CString::new(src).map_err(|_| CudaError::Nvrtc("source has a NUL byte".into()))?;
    let prog = nvrtc::create_program(&csrc, None).map_err(|e| CudaError::Nvrtc(format!("{e:?}")))?;
    let res = unsafe { nvrtc::compile_program(prog, &opts) };
    if let Err(e) = res {
        let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>()).unwrap_or_default();
        let _ = unsafe { nvrtc::destroy_program(prog) };
        return Err(CudaError::Nvrtc(format!("{e:?}\n{log}")));
    }
    let mut size = 0usize;
    let cubin = unsafe {
        nvsys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| CudaError::Nvrtc(format!("{e:?}")))?;
        let mut buf = vec![0u8; size];
        nvsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _).result().map_err(|e| CudaError::Nvrtc(format!("{e:?}")))?;
        let _ = nvrtc::destroy_program(prog);
        buf
    };
    if let Some(p) = &path {
        // write-then-rename so a concurrent reader never sees a partial file
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prologue_inserted_unless_manual() {
        let src = "extern \"C\" __global__ void a(int x) { body(); }\nextern \"C\" __global__ void b(int x) PDL_MANUAL { pre(); pdl_prologue(); }\n";
        let out = with_pdl_prologue(src);
        assert!(out.contains("void a(int x) { TRACE_KERNEL(); pdl_prologue(); body(); }"), "{out}");
        assert!(out.contains("PDL_MANUAL { TRACE_KERNEL(); pre(); pdl_prologue(); }"), "{out}");
        assert_eq!(out.matches("pdl_prologue").count(), 2);
    }

    #[test]
    fn manual_kernels_call_the_prologue() {
        // every kernel body (or the body template it calls) with PDL_MANUAL
        // must reach pdl_prologue(): its file has at least one call per
        // such family, and no automatic one is added to it
        let src = full_source();
        let manual = src.matches("PDL_MANUAL {").count();
        assert!(manual > 0);
        for (name, file) in SOURCES {
            if file.contains("PDL_MANUAL {") {
                assert!(file.contains("pdl_prologue();"), "{name}: PDL_MANUAL kernels without a prologue call");
            }
        }
    }
}
