//! The model worker's wire protocol: what a backend sends the model process over its Unix
//! socket and what comes back. One frame is a little-endian `u32` length and a bincode body;
//! one connection carries one request at a time, and closing it cancels what it asked for.

use crate::engine::ModelSpec;
use crate::generate::{GenerateRequest, Generated};
use crate::lora::{JobRequest, JobResponse, JobSpec, TrainingStatus};
use lorag_lora::train::Progress;
use crate::ModelError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{self, Read};

/// The largest frame either side accepts (a guard against a corrupted length, not a quota).
pub const MAX_FRAME: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Embed `texts` with `model`; answered with [`Response::Embeddings`], one per text.
    Embed { model: ModelSpec, texts: Vec<String> },
    /// Generate text; answered with [`Response::Generated`]. Decoded in steps together with
    /// the other requests for the same model.
    Generate(GenerateRequest),
    /// Answered at once with [`Response::Status`], never queued behind computation.
    Status,
    /// Scores `documents` against `query` with a cross-encoder (ONNX Runtime loaded from
    /// `library`); answered with [`Response::Scores`], one per document. Runs on the
    /// connection's own thread, and stops between batches when the backend hangs up.
    Rerank { model: ModelSpec, query: String, documents: Vec<String> },
    /// Opens a training or perplexity job on this connection (answered with
    /// [`JobResponse::Opened`]); the rows follow as [`Request::Job`]s.
    JobOpen(JobSpec),
    /// The next step of the open job. A training feed answers with [`Response::Progress`]
    /// after every optimiser step, then with its [`Response::Job`].
    Job(JobRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Embeddings(Vec<Vec<f32>>),
    Scores(Vec<f32>),
    Generated(Generated),
    Status(WorkerStatus),
    Error(ModelError),
    Job(JobResponse),
    /// Sent during a job's request, before its answer.
    Progress(Progress),
}

/// What `lorag.worker_status()` shows of the model process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: u32,
    pub device: Option<String>,
    pub models: Vec<String>,
    pub memory_bytes: u64,
    /// Requests received and not yet answered.
    pub queue_depth: u64,
    pub requests_served: u64,
    /// Forward passes run, and texts in them (their ratio is the mean batch).
    pub batches: u64,
    pub batched_texts: u64,
    /// Decoding steps run, and streams in them (their ratio is the mean decoding batch).
    pub decode_steps: u64,
    pub decoded_streams: u64,
    /// Adapters being trained now.
    pub trainings: Vec<TrainingStatus>,
    /// Loaded rerankers and the ONNX Runtime execution provider each really runs on.
    pub rerankers: Vec<(String, String)>,
    /// Loaded embedders and the runtime that computes each ("onnxruntime CPUExecutionProvider").
    pub embedders: Vec<(String, String)>,
}

/// `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = bincode::serialize(msg).expect("protocol types always serialise");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ModelError> {
    bincode::deserialize(body).map_err(|e| ModelError::Runtime(format!("malformed model worker message: {e}")))
}

/// Reads one frame's body; `None` when the peer closed the connection between frames.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Collects bytes read without blocking until a whole frame is there.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The first complete frame's body, if one has arrived.
    pub fn next_frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let spec = ModelSpec::new("m", "/x", None, "cpu");
        let req = Request::Embed { model: spec, texts: vec!["a".into(), "".into(), "ü".repeat(1000)] };
        let frame = encode(&req);
        let body = read_frame(&mut frame.as_slice()).unwrap().unwrap();
        assert_eq!(decode::<Request>(&body).unwrap(), req);

        let mut fb = FrameBuffer::default();
        let two: Vec<u8> = [frame.clone(), encode(&Request::Status)].concat();
        let mut got = Vec::new();
        for b in two {
            fb.extend(&[b]);
            while let Some(body) = fb.next_frame().unwrap() {
                got.push(decode::<Request>(&body).unwrap());
            }
        }
        assert_eq!(got, vec![req, Request::Status]);
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
        assert!(decode::<Response>(&[0xff; 3]).is_err());
        let mut bad = FrameBuffer::default();
        bad.extend(&u32::MAX.to_le_bytes());
        assert!(bad.next_frame().is_err());
    }
}
