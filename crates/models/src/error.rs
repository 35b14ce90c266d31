use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Everything that can go wrong with a model, with what the user can do about it. It crosses
/// the model worker's socket as it is, so the backend raises the same ERROR either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelError {
    /// The model folder or one of its files does not exist.
    Missing { path: PathBuf },
    /// A file exists but cannot be used (truncated, corrupted, wrong format).
    Corrupt { path: PathBuf, detail: String },
    /// The file's sha256 is not the one registered.
    Checksum { path: PathBuf, expected: String, actual: String },
    /// Reading failed for another reason.
    Io { path: PathBuf, detail: String },
    /// Tokenising failed.
    Tokenizer(String),
    /// The runtime failed while computing.
    Runtime(String),
    /// A request the model cannot serve (e.g. bad arguments).
    Invalid(String),
    /// A request the model cannot serve as asked, and what to change so that it can (e.g. a
    /// prompt longer than the context).
    Refused { detail: String, hint: String },
    /// The model process ended (crash, OOM kill) while it held this request.
    WorkerDied(String),
    /// Something the server needs is not set up (e.g. the ONNX Runtime library).
    Setup { detail: String, hint: String },
    /// The file is a model, but not of the kind asked for (e.g. an ONNX file that is not a
    /// cross-encoder).
    Unsuitable { detail: String, hint: String },
}

impl ModelError {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::Missing { path: path.to_owned() }
        } else {
            ModelError::Io { path: path.to_owned(), detail: e.to_string() }
        }
    }

    pub fn corrupt(path: &Path, detail: impl fmt::Display) -> Self {
        ModelError::Corrupt { path: path.to_owned(), detail: detail.to_string() }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Missing { path } => write!(f, "model file \"{}\" does not exist", path.display()),
            ModelError::Corrupt { path, detail } => {
                write!(f, "model file \"{}\" is corrupted or not a model: {detail}", path.display())
            }
            ModelError::Checksum { path, expected, actual } => write!(
                f,
                "model file \"{}\" has sha256 {actual}, expected {expected}",
                path.display()
            ),
            ModelError::Io { path, detail } => write!(f, "cannot read \"{}\": {detail}", path.display()),
            ModelError::Tokenizer(d) => write!(f, "tokenizer failed: {d}"),
            ModelError::Runtime(d) => write!(f, "model runtime failed: {d}"),
            ModelError::Invalid(d) => write!(f, "{d}"),
            ModelError::WorkerDied(d) => write!(f, "the lorag model process ended while running this request: {d}"),
            ModelError::Setup { detail, .. } | ModelError::Unsuitable { detail, .. } | ModelError::Refused { detail, .. } => f.write_str(detail),
        }
    }
}

impl std::error::Error for ModelError {}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Runtime(e.to_string())
    }
}
