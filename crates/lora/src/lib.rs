//! LoRA: low-rank adapters on a frozen base model.
//!
//! An adapter adds `scale · B·A·x` to chosen linear maps of the base model (A: rank × in,
//! B: out × rank, scale = alpha / rank); only A and B are trained, so the base never changes and
//! adapters never disturb each other. This crate holds what does not depend on a particular
//! model: the configuration ([`config`]), the adapter and its Hugging Face PEFT format
//! ([`adapter`]), a matrix product through frozen weights that skips their gradient
//! ([`frozen`]), and the training loop over any [`train::CausalLm`] ([`train`]).

pub mod adapter;
pub mod config;
pub mod frozen;
pub mod ops;
pub mod train;

pub use adapter::Adapter;
pub use config::{LoraConfig, TrainConfig, MODULES};

/// What went wrong, in words a user can act on (the caller maps it to an SQLSTATE).
#[derive(Debug, Clone, PartialEq)]
pub enum LoraError {
    /// A bad argument or a bad adapter (shape, name, config).
    Invalid(String),
    /// The runtime failed.
    Runtime(String),
    /// Stopped on request (query cancel).
    Cancelled,
}

impl std::fmt::Display for LoraError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraError::Invalid(m) | LoraError::Runtime(m) => f.write_str(m),
            LoraError::Cancelled => f.write_str("training was cancelled"),
        }
    }
}

impl std::error::Error for LoraError {}

impl From<candle_core::Error> for LoraError {
    fn from(e: candle_core::Error) -> LoraError {
        LoraError::Runtime(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, LoraError>;
