//! The engine: loaded models by folder and device, and the computations on them. One engine
//! lives in the model process (shared by every connection) or, without the worker, in each
//! backend. The backend resolves *which* model (registry lookup, with the caller's privileges)
//! and sends a [`ModelSpec`]; the engine never reads tables.

use crate::device::DeviceChoice;
use crate::embed::Embedder;
use crate::generate::{GenerateRequest, Generated, Generator, Stream};
use crate::ModelError;
use lorag_lora::Adapter;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A registered model as the backend resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    /// The model folder (absolute).
    pub path: PathBuf,
    /// sha256 of the weights, checked once when the model is loaded.
    pub checksum: Option<String>,
    /// `lorag.device` of the caller: auto | cpu | cuda:N.
    pub device: String,
    /// `lorag.embedding_runtime` of the caller: auto | candle | onnxruntime.
    #[serde(default)]
    pub runtime: String,
    /// `lorag.onnxruntime_library` of the caller (empty: not set).
    #[serde(default)]
    pub library: String,
}

impl ModelSpec {
    /// A spec with the default runtime and no ONNX Runtime library.
    pub fn new(name: &str, path: impl Into<PathBuf>, checksum: Option<String>, device: &str) -> ModelSpec {
        ModelSpec { name: name.into(), path: path.into(), checksum, device: device.into(), runtime: String::new(), library: String::new() }
    }

    /// What tells loaded models apart (the library is one per process).
    pub fn key(&self) -> (PathBuf, Option<String>, String) {
        (self.path.clone(), self.checksum.clone(), format!("{} {}", self.device, self.runtime))
    }
}

/// Inputs per forward pass: large requests are split, and requests of several connections for
/// the same model are joined, up to this many texts.
pub const BATCH: usize = 32;

/// Parsed adapters kept per process.
const ADAPTER_CACHE: usize = 32;

type Key = (PathBuf, Option<String>, String);

#[derive(Default)]
pub struct Engine {
    embedders: HashMap<Key, Arc<Embedder>>,
    generators: HashMap<Key, Arc<Generator>>,
    /// Parsed adapters by the sha256 of their weights (and their model's key).
    adapters: HashMap<(Key, String), Arc<Adapter>>,
    /// Loaded model names, in load order (for the status).
    names: Vec<String>,
    /// The device that really runs, once a model is loaded.
    device: Option<String>,
    /// Each loaded embedder's runtime and device ("candle cpu", "onnxruntime CPUExecutionProvider").
    runtimes: Vec<(String, String)>,
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    /// Checks the weights' checksum and resolves the device, before a model loads.
    fn prepare(&mut self, spec: &ModelSpec) -> Result<candle_core::Device, ModelError> {
        if let Some(expected) = &spec.checksum {
            // a folder's model.safetensors, or a model that is one file (a GGUF)
            let weights = if spec.path.is_file() { spec.path.clone() } else { spec.path.join("model.safetensors") };
            let actual = crate::sha256_file(&weights)?;
            if &actual != expected {
                return Err(ModelError::Checksum { path: weights, expected: expected.clone(), actual });
            }
        }
        let (device, device_name) = DeviceChoice::parse(&spec.device)?.resolve()?;
        self.named(spec);
        self.device = Some(device_name);
        Ok(device)
    }

    fn named(&mut self, spec: &ModelSpec) {
        if !self.names.contains(&spec.name) {
            self.names.push(spec.name.clone());
        }
    }

    /// The embedder for `spec`, loaded (checksum verified) on first use.
    pub fn embedder(&mut self, spec: &ModelSpec) -> Result<Arc<Embedder>, ModelError> {
        if let Some(e) = self.embedders.get(&spec.key()) {
            return Ok(e.clone());
        }
        let e = if crate::embed::Runtime::parse(&spec.runtime)?.onnx_for(&spec.path, &spec.library)? {
            // ONNX Runtime picks its own device (and checks the checksum against the export)
            let e = Embedder::load_onnx(&spec.path, &spec.device, &spec.library, spec.checksum.as_deref())?;
            self.named(spec);
            self.device = Some(match e.runtime.split_once("CUDAExecutionProvider:") {
                Some((_, n)) => format!("cuda:{n}"),
                None => "cpu".into(),
            });
            e
        } else {
            let device = self.prepare(spec)?;
            let mut e = Embedder::load(&spec.path, &device)?;
            e.runtime = format!("candle {}", self.device.as_deref().unwrap_or("cpu"));
            e
        };
        self.runtimes.retain(|(name, _)| name != &spec.name);
        self.runtimes.push((spec.name.clone(), e.runtime.clone()));
        let e = Arc::new(e);
        self.embedders.insert(spec.key(), e.clone());
        Ok(e)
    }

    /// The generator for `spec`, loaded (checksum verified) on first use.
    pub fn generator(&mut self, spec: &ModelSpec) -> Result<Arc<Generator>, ModelError> {
        if let Some(g) = self.generators.get(&spec.key()) {
            return Ok(g.clone());
        }
        let device = self.prepare(spec)?;
        let g = Arc::new(Generator::load(&spec.path, &device)?);
        self.generators.insert(spec.key(), g.clone());
        Ok(g)
    }

    /// `req`'s adapter, parsed for its model on first use. A retrained adapter has other
    /// weights, so another checksum: it is parsed anew, never served stale.
    pub fn adapter(&mut self, req: &GenerateRequest, generator: &Generator) -> Result<Option<Arc<Adapter>>, ModelError> {
        let Some(payload) = &req.adapter else { return Ok(None) };
        // the weights' checksum (computed by PostgreSQL from the stored bytes) and the config
        // (the same weights at another alpha are another adapter)
        let config = serde_json::to_string(&payload.config).expect("a config serialises");
        let key = (req.model.key(), format!("{}:{config}", payload.sha256));
        if let Some(a) = self.adapters.get(&key) {
            return Ok(Some(a.clone()));
        }
        let adapter = Arc::new(crate::lora::parse_adapter(payload, generator)?);
        // A few adapters stay parsed; beyond that the cache starts over (a parse is milliseconds).
        if self.adapters.len() >= ADAPTER_CACHE {
            self.adapters.clear();
        }
        self.adapters.insert(key, adapter.clone());
        Ok(Some(adapter))
    }

    pub fn loaded_models(&self) -> &[String] {
        &self.names
    }

    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// Each loaded embedder with the runtime that computes it.
    pub fn runtimes(&self) -> &[(String, String)] {
        &self.runtimes
    }
}

/// What is loaded, for the status.
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// The device the last loaded model runs on.
    pub device: Option<String>,
    pub models: Vec<String>,
    /// Each loaded embedder with the runtime that computes it.
    pub embedders: Vec<(String, String)>,
}

/// Work for a lane: it gets the function that embeds one text on that lane.
pub type LaneWork = Box<dyn FnOnce(&dyn Fn(&str) -> Result<Vec<f32>, ModelError>) + Send>;

/// An embedder that runs texts side by side, one text per run on each of its lanes (ONNX
/// Runtime's CPU lanes): the scheduler hands a lane its work and goes on.
pub trait Lanes: Send + Sync {
    /// How many lanes run side by side.
    fn count(&self) -> usize;
    /// Runs `work` on a lane's thread.
    fn spawn(self: Arc<Self>, work: LaneWork);
}

/// What the scheduler of the model process computes; a trait so the batching can be tested
/// without a model.
pub trait Compute {
    /// A generation in progress.
    type Stream: Send;
    /// Embeds one batch of at most [`BATCH`] texts with one forward pass.
    fn embed(&mut self, spec: &ModelSpec, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Prepares a generation (loads the model, tokenises the prompt).
    fn start(&mut self, req: &GenerateRequest) -> Result<Self::Stream, ModelError>;
    /// One decoding step of several streams of `spec`'s model, together.
    fn step(&mut self, spec: &ModelSpec, streams: &mut [&mut Self::Stream]) -> Result<(), ModelError>;
    /// The answer of a stream, once it has finished.
    fn finished(&mut self, spec: &ModelSpec, stream: &Self::Stream) -> Option<Result<Generated, ModelError>>;
    /// Device, loaded models, the embedders' runtimes.
    fn describe(&self) -> Described;
    /// The language model of `spec`, for a training or perplexity job that runs beside the
    /// scheduler.
    fn language_model(&mut self, spec: &ModelSpec) -> Result<Arc<Generator>, ModelError> {
        Err(ModelError::Invalid(format!("model \"{}\" cannot run jobs here", spec.name)))
    }
    /// The lanes of `spec`'s embedder (loaded on first use), if it has them.
    fn lanes(&mut self, _spec: &ModelSpec) -> Result<Option<Arc<dyn Lanes>>, ModelError> {
        Ok(None)
    }
}

impl Compute for Engine {
    type Stream = Stream;

    fn embed(&mut self, spec: &ModelSpec, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embedder(spec)?.embed(texts)
    }

    fn start(&mut self, req: &GenerateRequest) -> Result<Stream, ModelError> {
        let g = self.generator(&req.model)?;
        let adapter = self.adapter(req, &g)?;
        g.start(req, adapter)
    }

    fn step(&mut self, spec: &ModelSpec, streams: &mut [&mut Stream]) -> Result<(), ModelError> {
        self.generator(spec)?.step(streams)
    }

    fn finished(&mut self, spec: &ModelSpec, stream: &Stream) -> Option<Result<Generated, ModelError>> {
        if !stream.is_finished() {
            return None;
        }
        Some(self.generator(spec).and_then(|g| g.result(stream)))
    }

    fn describe(&self) -> Described {
        Described { device: self.device.clone(), models: self.names.clone(), embedders: self.runtimes.clone() }
    }

    fn language_model(&mut self, spec: &ModelSpec) -> Result<Arc<Generator>, ModelError> {
        self.generator(spec)
    }

    fn lanes(&mut self, spec: &ModelSpec) -> Result<Option<Arc<dyn Lanes>>, ModelError> {
        let e = self.embedder(spec)?;
        Ok(e.has_lanes().then(|| e as Arc<dyn Lanes>))
    }
}
