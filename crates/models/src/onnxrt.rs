//! ONNX Runtime, shared by the rerankers and the embedders that run on it: the library, loaded
//! once per process from an absolute path (`lorag.onnxruntime_library`) after checking the
//! file, so a missing or wrong library is an error and never a panic; sessions on the device
//! `lorag.device` allows, with an explicit provider list (ONNX Runtime would otherwise fall
//! back to the CPU silently); and BERT's inputs.

use crate::device::DeviceChoice;
use crate::ModelError;
use ort::session::builder::PrepackedWeights;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The library this process loaded ONNX Runtime from (it cannot be unloaded or swapped), and
/// its environment.
static RUNTIME: OnceLock<(PathBuf, ort::environment::Environment)> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

pub const LIBRARY_HINT: &str = "Set lorag.onnxruntime_library to the absolute path of libonnxruntime.so from the onnxruntime 1.32 wheel (make models puts it under models/onnxruntime/).";

fn runtime_error(detail: String) -> ModelError {
    ModelError::Setup { detail, hint: LIBRARY_HINT.into() }
}

/// Loads ONNX Runtime from `library` once per process.
pub fn load_runtime(library: &str) -> Result<&'static ort::environment::Environment, ModelError> {
    let _guard = RUNTIME_INIT.lock().unwrap_or_else(|p| p.into_inner());
    let path = PathBuf::from(library);
    if let Some((loaded, env)) = RUNTIME.get() {
        if *loaded != path && !library.is_empty() {
            return Err(ModelError::Setup {
                detail: format!("ONNX Runtime is already loaded from \"{}\" in this process", loaded.display()),
                hint: "A new lorag.onnxruntime_library takes effect after a server restart.".into(),
            });
        }
        return Ok(env);
    }
    if library.is_empty() {
        return Err(runtime_error("lorag.onnxruntime_library is not set".into()));
    }
    if !path.is_absolute() {
        return Err(runtime_error(format!("lorag.onnxruntime_library \"{library}\" is not an absolute path")));
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(runtime_error(format!("\"{library}\" is not a file"))),
        Err(e) => return Err(runtime_error(format!("cannot use ONNX Runtime library \"{library}\": {e}"))),
    }
    // dlopen, then the version check (ort refuses a library older than its API level)
    let builder = ort::init_from(&path).map_err(|e| runtime_error(format!("cannot load ONNX Runtime: {e}")))?;
    let env = builder.with_name("lorag").build().map_err(|e| runtime_error(format!("cannot start ONNX Runtime: {e}")))?;
    Ok(&RUNTIME.get_or_init(|| (path, env)).1)
}

/// Whether the loaded ONNX Runtime was built with the CUDA execution provider.
fn has_cuda() -> bool {
    use ort::ep::ExecutionProvider;
    <ort::ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false)
}

/// A session on `bytes` (the ONNX file `path`) on the device `device` (auto | cpu | cuda:N)
/// allows, and the execution provider that really runs it.
pub fn session(path: &Path, bytes: &[u8], device: &str, library: &str) -> Result<(Session, String), ModelError> {
    session_with(path, bytes, device, library, None, None)
}

/// The initializers of one model, held once and handed to each of its sessions (ONNX Runtime
/// then uses them in place instead of reading its own copy from the file), and one container
/// for the forms its kernels pre-pack them into (the matrix products' weights), so that several
/// sessions of one model cost about what one does.
pub struct SharedWeights {
    initializers: Vec<(String, Arc<DynValue>)>,
    prepacked: PrepackedWeights,
}

impl SharedWeights {
    /// The initializers of the model `onnx` stored as raw float32 or int64 data (as lorag's own
    /// exports and Hugging Face's are); `None` when the file does not read that way, and its
    /// sessions then load their own copies. ONNX Runtime must be loaded ([`runs_on_cpu`]).
    pub fn from_model(onnx: &[u8]) -> Option<SharedWeights> {
        let graph = crate::onnx::ModelProto::decode(onnx).ok()?.graph?;
        let mut initializers = Vec::with_capacity(graph.initializer.len());
        for t in graph.initializer {
            // the size the dimensions give, checked: a damaged file may give any numbers
            let bytes = |width: usize| t.dims.iter().try_fold(width, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
            let value = match t.data_type {
                FLOAT if bytes(4) == Some(t.raw_data.len()) => {
                    let data: Vec<f32> = t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    Tensor::from_array((t.dims, data)).ok()?.into_dyn()
                }
                INT64 if bytes(8) == Some(t.raw_data.len()) => {
                    let data: Vec<i64> = t.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
                    Tensor::from_array((t.dims, data)).ok()?.into_dyn()
                }
                // kept in the file: every session reads its own copy of these
                _ => continue,
            };
            initializers.push((t.name, Arc::new(value)));
        }
        Some(SharedWeights { initializers, prepacked: PrepackedWeights::new() })
    }
}

/// ONNX's element types, as `TensorProto.data_type` gives them.
const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Loads ONNX Runtime from `library` (once per process) and says whether sessions on `device`
/// run on the CPU.
pub fn runs_on_cpu(device: &str, library: &str) -> Result<bool, ModelError> {
    let choice = DeviceChoice::parse(device)?;
    load_runtime(library)?;
    Ok(cuda_device(choice)?.is_none())
}

/// The CUDA device sessions on `choice` ask for (`None`: the CPU). ONNX Runtime must be loaded.
fn cuda_device(choice: DeviceChoice) -> Result<Option<usize>, ModelError> {
    Ok(match choice {
        DeviceChoice::Cpu => None,
        DeviceChoice::Auto => has_cuda().then_some(0),
        DeviceChoice::Cuda(n) => {
            if !has_cuda() {
                return Err(ModelError::Setup {
                    detail: format!("device cuda:{n}: this ONNX Runtime library has no CUDA execution provider"),
                    hint: "Point lorag.onnxruntime_library at the library of the onnxruntime-gpu wheel, or set lorag.device to auto or cpu.".into(),
                });
            }
            Some(n)
        }
    })
}

/// [`session`], with `threads` threads per run (ONNX Runtime's default: one per core) and the
/// model's initializers taken from `shared` (the CPU only).
pub fn session_with(path: &Path, bytes: &[u8], device: &str, library: &str, threads: Option<usize>, shared: Option<&SharedWeights>) -> Result<(Session, String), ModelError> {
    let choice = DeviceChoice::parse(device)?;
    let env = load_runtime(library)?;
    let cuda = cuda_device(choice)?;
    let build = |cuda: Option<usize>| -> Result<Session, ModelError> {
        let builder = Session::builder(env).map_err(|e| ModelError::Runtime(e.to_string()))?;
        let builder = match cuda {
            Some(n) => builder
                .with_execution_providers([ort::ep::CUDA::default().with_device_id(n as i32).build().error_on_failure()])
                .map_err(|e| ModelError::Setup {
                    detail: format!("device cuda:{n} is not usable by ONNX Runtime: {e}"),
                    hint: "Check the CUDA libraries onnxruntime-gpu needs, or set lorag.device to auto or cpu.".into(),
                })?,
            // ort's CPU provider turns ONNX Runtime's arena off unless asked: every run would
            // then malloc and free (and, for the larger activations, mmap and fault in) each
            // intermediate tensor. ONNX Runtime's own default, and Python's, is the arena.
            None => builder
                .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(true).build().error_on_failure()])
                .map_err(|e| ModelError::Runtime(e.to_string()))?,
        };
        // Inputs change shape with every batch (texts x tokens): ONNX Runtime's memory patterns
        // would keep an allocation plan per shape seen, growing the model process for nothing.
        let mut builder = builder.with_memory_pattern(false).map_err(|e| ModelError::Runtime(e.to_string()))?;
        if let Some(n) = threads {
            builder = builder.with_intra_threads(n).map_err(|e| ModelError::Runtime(e.to_string()))?;
        }
        if let (Some(shared), None) = (shared, cuda) {
            builder = builder.with_prepacked_weights(&shared.prepacked).map_err(|e| ModelError::Runtime(e.to_string()))?;
            for (name, value) in &shared.initializers {
                builder = builder.with_initializer(name, value.clone()).map_err(|e| ModelError::Runtime(e.to_string()))?;
            }
        }
        builder.commit_from_memory(bytes).map_err(|e| ModelError::corrupt(path, e))
    };
    Ok(match (choice, cuda) {
        // auto: CUDA when it registers, the CPU otherwise (and the status says which)
        (DeviceChoice::Auto, Some(n)) => match build(Some(n)) {
            Ok(s) => (s, format!("CUDAExecutionProvider:{n}")),
            Err(_) => (build(None)?, "CPUExecutionProvider".to_string()),
        },
        (_, Some(n)) => (build(Some(n))?, format!("CUDAExecutionProvider:{n}")),
        (_, None) => (build(None)?, "CPUExecutionProvider".to_string()),
    })
}

/// Checks that `session` takes BERT's inputs (`input_ids`, `attention_mask`, optionally
/// `token_type_ids`, all int64) and says whether it takes token types; `unsuitable` words the
/// error.
pub fn bert_inputs(session: &Session, unsuitable: &dyn Fn(String) -> ModelError) -> Result<bool, ModelError> {
    let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    for required in ["input_ids", "attention_mask"] {
        if !names.contains(&required) {
            return Err(unsuitable(format!("it has no input \"{required}\" (inputs: {})", names.join(", "))));
        }
    }
    if let Some(other) = names.iter().find(|n| !["input_ids", "attention_mask", "token_type_ids"].contains(n)) {
        return Err(unsuitable(format!("it wants an input \"{other}\"")));
    }
    for input in session.inputs() {
        if input.dtype().tensor_type() != Some(ort::value::TensorElementType::Int64) {
            return Err(unsuitable(format!("input \"{}\" is not a tensor of int64", input.name())));
        }
    }
    Ok(names.contains(&"token_type_ids"))
}

/// The output named `name`, or else the only output.
pub fn output_index(session: &Session, name: &str) -> Option<usize> {
    let outputs = session.outputs();
    outputs.iter().position(|o| o.name() == name).or_else(|| (outputs.len() == 1).then_some(0))
}

/// The inputs of one run over `batch`, padded to its longest encoding.
pub fn encode(batch: &[&tokenizers::Encoding], token_types: bool) -> Result<Vec<(&'static str, SessionInputValue<'static>)>, ModelError> {
    let (len, ids, types, mask) = crate::embed::padded(batch);
    let shape = [batch.len() as i64, len as i64];
    let tensor = |v: Vec<u32>| -> Result<SessionInputValue<'static>, ModelError> {
        let wide: Vec<i64> = v.into_iter().map(i64::from).collect();
        Ok(Tensor::from_array((shape, wide)).map_err(|e| ModelError::Runtime(e.to_string()))?.into_dyn().into())
    };
    let mut inputs = vec![("input_ids", tensor(ids)?), ("attention_mask", tensor(mask)?)];
    if token_types {
        inputs.push(("token_type_ids", tensor(types)?));
    }
    Ok(inputs)
}
