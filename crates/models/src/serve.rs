//! The model process: the one place that runs models when lorag's worker is enabled.
//!
//! Threads: one accepts connections, one per connection reads its requests, and the calling
//! thread is the scheduler that owns the models and computes. (This process is not a
//! PostgreSQL process: the worker forked it and it never calls PostgreSQL, so its threads are
//! free to block.)
//!
//! Batching: the scheduler takes the oldest request's model and fills one forward pass of up
//! to [`BATCH`] texts from every queued request for that model, oldest first. So requests
//! arriving together from several backends share a pass, and one large request is cut into
//! passes that others can join.
//!
//! Lanes: an embedder that runs texts side by side (ONNX Runtime on a CPU with several cores,
//! one text per run on each lane) gets a pass whenever one of its lanes is free, of that lane's
//! share of the pending texts, and runs it on the lane while the scheduler goes on; each request
//! is answered as soon as its last text is done. So no lane waits for another to end its pass
//! (on 2 cores, 8 connections embedding one row at a time reach the rate of two single-core runs
//! side by side). A lone text on idle lanes is a pass on all cores, here.
//!
//! Generation: each request becomes a stream; every scheduler turn runs one decoding step for
//! all live streams of one model together (a new stream's whole prompt rides along in the same
//! step), alternating with embedding passes so neither starves.
//!
//! Cancel: a backend that gives up (query cancel, statement_timeout, disconnect) closes its
//! connection; the reader drops that connection's queued requests at once, the scheduler drops
//! its streams before the next step, and a pass already running for it finishes without anyone
//! receiving its result (at most one pass or step is wasted).

use crate::engine::{Compute, ModelSpec, BATCH};
use crate::generate::{GenerateRequest, Generator};
use crate::lora::{Job as RowJob, JobRequest, JobResponse, JobSpec, TrainingStatus};
use crate::protocol::{decode, encode, read_frame, Request, Response, WorkerStatus};
use lorag_lora::train::Progress;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A backend that does not read its answer for this long is dropped, so one stuck backend
/// cannot stall the scheduler.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = Arc<Mutex<UnixStream>>;

struct Job {
    id: u64,
    conn: u64,
    spec: ModelSpec,
    texts: Vec<String>,
    /// Texts handed to a pass (or to the lanes) so far, the first `taken`.
    taken: usize,
    /// Each text's embedding once computed, and how many are.
    out: Vec<Option<Vec<f32>>>,
    done: usize,
    reply: Reply,
}

/// An embedding pass: the model, its texts, which texts of which requests they are, as
/// (job, first text, count), and whether it runs on one of the model's lanes.
type Pass = (ModelSpec, Vec<String>, Vec<(u64, usize, usize)>, bool);

/// What the scheduler takes each turn: new generations, connections closed, models wanted by
/// jobs, and the next embedding pass.
type Work = (Vec<GenJob>, Vec<u64>, Vec<(ModelSpec, Loaded)>, Option<Pass>);

/// Whether the backend at the other end of `fd` hung up (it sends nothing while a job runs).
fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // Safety: one pollfd on the stack, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// How long the scheduler waits idle before it hands freed memory back to the OS.
const TRIM_AFTER: Duration = Duration::from_millis(500);

/// Streams decoded together in one step, at most.
const MAX_STREAMS: usize = 16;

struct GenJob {
    conn: u64,
    request: GenerateRequest,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    embed: VecDeque<Job>,
    generate: VecDeque<GenJob>,
    /// Connections closed since the scheduler last looked: their streams are dropped.
    closed: Vec<u64>,
    /// Language models wanted by jobs on connection threads.
    loads: Vec<(ModelSpec, Loaded)>,
    /// Lanes running a pass, by embedder.
    lanes_busy: HashMap<ModelSpec, usize>,
}

/// Embedders' lanes by model, looked up after a model's first pass (`None`: it has none).
type LaneSets = HashMap<ModelSpec, Option<Arc<dyn crate::engine::Lanes>>>;

type Loaded = mpsc::Sender<Result<Arc<Generator>, crate::ModelError>>;

#[derive(Default)]
struct Shared {
    jobs: Mutex<Queue>,
    ready: Condvar,
    /// Streams being decoded (owned by the scheduler; counted here for the status).
    streams: AtomicU64,
    decode_steps: AtomicU64,
    decoded_streams: AtomicU64,
    next_id: AtomicU64,
    served: AtomicU64,
    batches: AtomicU64,
    batched_texts: AtomicU64,
    /// Device and loaded models, as the scheduler last saw them.
    describe: Mutex<crate::engine::Described>,
    /// Training jobs by connection, for the progress view.
    trainings: Mutex<HashMap<u64, TrainingStatus>>,
}

fn send(reply: &Reply, response: &Response) {
    let frame = encode(response);
    let mut stream = reply.lock().unwrap_or_else(|p| p.into_inner());
    // A backend that went away is not an error here: its reader drops its requests. A write that
    // failed part-way (timeout) would leave half a frame: the connection is closed instead.
    if stream.write_all(&frame).is_err() {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Shared {
    fn status(&self) -> WorkerStatus {
        let crate::engine::Described { device, models, embedders } = self.describe.lock().unwrap_or_else(|p| p.into_inner()).clone();
        WorkerStatus {
            pid: std::process::id(),
            device,
            models,
            memory_bytes: crate::resident_bytes(),
            queue_depth: {
                let q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                (q.embed.len() + q.generate.len()) as u64 + self.streams.load(Ordering::Relaxed)
            },
            requests_served: self.served.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            batched_texts: self.batched_texts.load(Ordering::Relaxed),
            decode_steps: self.decode_steps.load(Ordering::Relaxed),
            decoded_streams: self.decoded_streams.load(Ordering::Relaxed),
            trainings: self.trainings.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect(),
            rerankers: crate::rerank::loaded(),
            embedders,
        }
    }

    /// Opens a job: its model comes from the scheduler (which owns the loaded models), the job
    /// itself then runs on the connection's thread.
    fn open_job(&self, conn: u64, spec: JobSpec) -> Result<(RowJob, JobResponse), crate::ModelError> {
        let (tx, rx) = mpsc::channel();
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).loads.push((spec.model().clone(), tx));
        self.ready.notify_one();
        let generator = rx.recv().map_err(|_| crate::ModelError::Runtime("the scheduler stopped".into()))??;
        let (job, opened) = guarded(|| RowJob::open(spec, generator))?;
        if let Some(status) = &job.status {
            self.trainings.lock().unwrap_or_else(|p| p.into_inner()).insert(conn, status.clone());
        }
        Ok((job, opened))
    }

    /// Runs one step of a connection's job, reporting training progress as it goes; the job
    /// stops when the backend hangs up (query cancel).
    fn run_job(&self, conn: u64, job: &mut RowJob, request: JobRequest, reply: &Reply, fd: RawFd) -> Result<JobResponse, crate::ModelError> {
        guarded(|| {
            job.handle(request, &mut |p: &Progress| {
                if let Some(s) = self.trainings.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&conn) {
                    s.progress = p.clone();
                }
                // training reports every step; scoring only asks whether to go on
                if p.total_steps > 0 {
                    send(reply, &Response::Progress(p.clone()));
                }
                !peer_closed(fd)
            })
        })
    }

    /// Reads one connection's requests until it closes, then drops what it left queued.
    fn read_connection(&self, conn: u64, mut stream: UnixStream) {
        let reply: Reply = match stream.try_clone() {
            Ok(w) => {
                let _ = w.set_write_timeout(Some(WRITE_TIMEOUT));
                Arc::new(Mutex::new(w))
            }
            Err(_) => return,
        };
        let mut job: Option<RowJob> = None;
        let fd = stream.as_raw_fd();
        while let Ok(Some(body)) = read_frame(&mut stream) {
            match decode::<Request>(&body) {
                Ok(Request::Status) => send(&reply, &Response::Status(self.status())),
                Ok(Request::JobOpen(spec)) => {
                    job = None;
                    self.trainings.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
                    match self.open_job(conn, spec) {
                        Ok((j, opened)) => {
                            job = Some(j);
                            send(&reply, &Response::Job(opened));
                        }
                        Err(e) => send(&reply, &Response::Error(e)),
                    }
                }
                Ok(Request::Job(request)) => {
                    let Some(j) = job.as_mut() else {
                        send(&reply, &Response::Error(crate::ModelError::Invalid("no job is open on this connection".into())));
                        continue;
                    };
                    let last = matches!(request, JobRequest::Finish);
                    let result = self.run_job(conn, j, request, &reply, fd);
                    if last || result.is_err() {
                        job = None;
                        self.trainings.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
                    }
                    self.served.fetch_add(1, Ordering::Relaxed);
                    send(&reply, &result.map_or_else(Response::Error, Response::Job));
                }
                Ok(Request::Rerank { model, query, documents }) => {
                    // on this thread: ONNX Runtime has its own threads, and the scheduler's
                    // embedding and decoding go on meanwhile
                    let result = guarded(|| {
                        let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
                        crate::rerank::reranker(&model)?.score(&query, &docs, &|| peer_closed(fd))
                    });
                    self.served.fetch_add(1, Ordering::Relaxed);
                    send(&reply, &result.map_or_else(Response::Error, Response::Scores));
                }
                Ok(Request::Embed { texts, .. }) if texts.is_empty() => {
                    self.served.fetch_add(1, Ordering::Relaxed);
                    send(&reply, &Response::Embeddings(Vec::new()));
                }
                Ok(Request::Embed { model, texts }) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let job = Job { id, conn, spec: model, taken: 0, out: vec![None; texts.len()], done: 0, texts, reply: reply.clone() };
                    self.jobs.lock().unwrap_or_else(|p| p.into_inner()).embed.push_back(job);
                    self.ready.notify_one();
                }
                Ok(Request::Generate(request)) => {
                    let job = GenJob { conn, request, reply: reply.clone() };
                    self.jobs.lock().unwrap_or_else(|p| p.into_inner()).generate.push_back(job);
                    self.ready.notify_one();
                }
                Err(e) => send(&reply, &Response::Error(e)),
            }
        }
        self.trainings.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
        let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        q.embed.retain(|j| j.conn != conn);
        q.generate.retain(|j| j.conn != conn);
        q.closed.push(conn);
        self.ready.notify_one();
    }

    /// Waits until there is work (unless `busy`: streams are live), then takes the new
    /// generation requests, the connections closed meanwhile, and the next embedding pass: the
    /// oldest request's model and up to BATCH of its pending texts taken from every request for
    /// that model, oldest first. An embedder with lanes (`lanes`) gets a pass
    /// only when a lane is free, of its share of the pending texts; a lone text on idle lanes
    /// is a pass on all cores.
    fn next_work(&self, busy: bool, lanes: &LaneSets) -> Work {
        let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let untaken = |j: &Job| j.taken < j.texts.len();
        // free lanes of a model: None when it has none
        let free = |q: &Queue, spec: &ModelSpec| {
            let lanes = lanes.get(spec)?.as_ref()?;
            Some(lanes.count().saturating_sub(q.lanes_busy.get(spec).copied().unwrap_or(0)))
        };
        let ready = |q: &Queue, j: &Job| untaken(j) && free(q, &j.spec) != Some(0);
        let idle = |q: &Queue| !busy && !q.embed.iter().any(|j| ready(q, j)) && q.generate.is_empty() && q.closed.is_empty() && q.loads.is_empty();
        if idle(&q) {
            // A connection that embeds one row at a time leaves the queue empty between its
            // requests for well under TRIM_AFTER: trimming then would hand the heap back after
            // every request, and the next one would fault it in again.
            let (woken, timeout) = self.ready.wait_timeout_while(q, TRIM_AFTER, |q| idle(q)).unwrap_or_else(|p| p.into_inner());
            q = woken;
            // (not while lanes compute: the scheduler waits for them, it is not idle)
            if timeout.timed_out() && q.lanes_busy.values().all(|&n| n == 0) {
                // Idle a while: hand the freed activations back to the OS, so the process's
                // memory is the models plus what the current work needs, not its past peak.
                // Safety: plain libc call, no invariants.
                unsafe { libc::malloc_trim(0) };
            }
        }
        while idle(&q) {
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let new: Vec<GenJob> = q.generate.drain(..).collect();
        let closed = std::mem::take(&mut q.closed);
        let loads = std::mem::take(&mut q.loads);
        let Some(first) = q.embed.iter().find(|j| ready(&q, j)) else { return (new, closed, loads, None) };
        let spec = first.spec.clone();
        let pending: usize = q.embed.iter().filter(|j| j.spec == spec).map(|j| j.texts.len() - j.taken).sum();
        let running = q.lanes_busy.get(&spec).copied().unwrap_or(0);
        let (limit, on_lanes) = match free(&q, &spec) {
            Some(free) if pending > 1 || running > 0 => (pending.div_ceil(free).clamp(1, BATCH), true),
            _ => (BATCH, false),
        };
        let mut texts = Vec::with_capacity(limit);
        let mut parts = Vec::new();
        for job in q.embed.iter_mut().filter(|j| j.spec == spec && untaken(j)) {
            let start = job.taken;
            let n = (job.texts.len() - start).min(limit - texts.len());
            texts.extend(job.texts[start..start + n].iter().cloned());
            job.taken += n;
            parts.push((job.id, start, n));
            if texts.len() == limit {
                break;
            }
        }
        if on_lanes {
            *q.lanes_busy.entry(spec.clone()).or_default() += 1;
        }
        (new, closed, loads, Some((spec, texts, parts, on_lanes)))
    }

    /// A lane finished its pass: it is free for the next.
    fn lane_free(&self, spec: &ModelSpec) {
        let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = q.lanes_busy.get_mut(spec) {
            *n = n.saturating_sub(1);
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Whether request `id` still waits for its embeddings (not cancelled, not failed).
    fn wanted(&self, id: u64) -> bool {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).embed.iter().any(|j| j.id == id)
    }

    /// Hands a pass's results to its requests and answers the ones now complete.
    fn finish_batch(&self, parts: &[(u64, usize, usize)], result: Result<Vec<Vec<f32>>, crate::ModelError>) {
        let mut answers = Vec::new();
        {
            let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let jobs = &mut q.embed;
            match result {
                Ok(vectors) => {
                    let mut vectors = vectors.into_iter();
                    for &(id, start, n) in parts {
                        let taken: Vec<Vec<f32>> = vectors.by_ref().take(n).collect();
                        // A request cancelled during the pass is gone: its part is discarded.
                        let Some(pos) = jobs.iter().position(|j| j.id == id) else { continue };
                        let job = &mut jobs[pos];
                        for (slot, v) in job.out[start..start + n].iter_mut().zip(taken) {
                            *slot = Some(v);
                        }
                        job.done += n;
                        if job.done == job.texts.len() {
                            let job = jobs.remove(pos).expect("position is in range");
                            answers.push((job.reply, Response::Embeddings(job.out.into_iter().map(Option::unwrap_or_default).collect())));
                        }
                    }
                }
                Err(e) => {
                    for &(id, _, _) in parts {
                        if let Some(pos) = jobs.iter().position(|j| j.id == id) {
                            let job = jobs.remove(pos).expect("position is in range");
                            answers.push((job.reply, Response::Error(e.clone())));
                        }
                    }
                }
            }
        }
        for (reply, response) in answers {
            self.served.fetch_add(1, Ordering::Relaxed);
            send(&reply, &response);
        }
    }
}

/// Serves `listener` with `compute` until the process ends. Runs the scheduler on the calling
/// thread.
pub fn serve<C: Compute>(listener: UnixListener, mut compute: C) -> ! {
    let shared = Arc::new(Shared::default());
    let acceptor = shared.clone();
    std::thread::Builder::new()
        .name("lorag-accept".into())
        .spawn(move || {
            let mut conn = 0u64;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                conn += 1;
                let shared = acceptor.clone();
                let id = conn;
                let _ = std::thread::Builder::new()
                    .name(format!("lorag-conn-{id}"))
                    .spawn(move || shared.read_connection(id, stream));
            }
        })
        .expect("spawning the accept thread");
    let mut live: Vec<Live<C::Stream>> = Vec::new();
    let mut lanes = LaneSets::new();
    loop {
        let (new, closed, loads, pass) = shared.next_work(!live.is_empty(), &lanes);
        live.retain(|l| !closed.contains(&l.conn));
        for (spec, loaded) in loads {
            let _ = loaded.send(guarded(|| compute.language_model(&spec)));
        }
        for job in new {
            match guarded(|| compute.start(&job.request)) {
                Ok(stream) => live.push(Live { conn: job.conn, spec: job.request.model, reply: job.reply, stream }),
                Err(e) => send(&job.reply, &Response::Error(e)),
            }
        }
        if let Some((spec, texts, parts, on_lanes)) = pass {
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.batched_texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
            match lanes.get(&spec).and_then(Option::as_ref).filter(|_| on_lanes) {
                // on a lane, while the scheduler goes on: each request is answered as soon as
                // its last text is done, and a lane never waits for the others
                Some(lane) => lane.clone().spawn(lane_work(shared.clone(), spec, texts, parts)),
                None => {
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    let result = guarded(|| compute.embed(&spec, &refs)).and_then(|v| {
                        if v.len() == refs.len() {
                            Ok(v)
                        } else {
                            Err(crate::ModelError::Runtime(format!("{} inputs gave {} embeddings", refs.len(), v.len())))
                        }
                    });
                    let loaded = result.is_ok();
                    shared.finish_batch(&parts, result);
                    if loaded && !lanes.contains_key(&spec) {
                        let found = guarded(|| compute.lanes(&spec)).ok().flatten();
                        lanes.insert(spec, found);
                    }
                }
            }
        }
        if !live.is_empty() {
            decode_step(&shared, &mut compute, &mut live);
        }
        shared.streams.store(live.len() as u64, Ordering::Relaxed);
        *shared.describe.lock().unwrap_or_else(|p| p.into_inner()) = compute.describe();
    }
}

/// A pass for a lane: each text still wanted is embedded and handed to its request at once;
/// the lane is free again when the pass ends, even by a panic.
fn lane_work(shared: Arc<Shared>, spec: ModelSpec, texts: Vec<String>, parts: Vec<(u64, usize, usize)>) -> crate::engine::LaneWork {
    struct Release(Arc<Shared>, ModelSpec);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.lane_free(&self.1);
        }
    }
    Box::new(move |embed| {
        let release = Release(shared, spec);
        let shared = &release.0;
        let mut texts = texts.into_iter();
        for (id, start, n) in parts {
            for (i, text) in (start..start + n).zip(texts.by_ref()) {
                if shared.wanted(id) {
                    shared.finish_batch(&[(id, i, 1)], embed(&text).map(|v| vec![v]));
                }
            }
        }
    })
}

/// A generation being decoded.
struct Live<S> {
    conn: u64,
    spec: ModelSpec,
    reply: Reply,
    stream: S,
}

/// Runs `f`, turning a panic inside the runtime into an error for the requests at hand.
fn guarded<T>(f: impl FnOnce() -> Result<T, crate::ModelError>) -> Result<T, crate::ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(crate::ModelError::Runtime(format!("panic: {}", what.unwrap_or_default())))
    })
}

/// One decoding step for up to MAX_STREAMS live streams of the oldest stream's model, then
/// answers the ones that finished.
fn decode_step<C: Compute>(shared: &Shared, compute: &mut C, live: &mut Vec<Live<C::Stream>>) {
    let spec = live[0].spec.clone();
    let chosen: Vec<usize> = (0..live.len()).filter(|&i| live[i].spec == spec).take(MAX_STREAMS).collect();
    let result = {
        let mut streams: Vec<&mut C::Stream> =
            live.iter_mut().enumerate().filter(|(i, _)| chosen.contains(i)).map(|(_, l)| &mut l.stream).collect();
        guarded(|| compute.step(&spec, &mut streams))
    };
    shared.decode_steps.fetch_add(1, Ordering::Relaxed);
    shared.decoded_streams.fetch_add(chosen.len() as u64, Ordering::Relaxed);
    let mut i = 0;
    let mut k = 0;
    live.retain_mut(|l| {
        let mine = chosen.get(k) == Some(&i);
        i += 1;
        if !mine {
            return true;
        }
        k += 1;
        let answer = match &result {
            Err(e) => Some(Response::Error(e.clone())),
            Ok(()) => compute.finished(&spec, &l.stream).map(|r| match r {
                Ok(g) => Response::Generated(g),
                Err(e) => Response::Error(e),
            }),
        };
        match answer {
            Some(response) => {
                shared.served.fetch_add(1, Ordering::Relaxed);
                send(&l.reply, &response);
                false
            }
            None => true,
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelError;
    use std::sync::atomic::AtomicUsize;

    /// Embeds a text as [its length, its first byte]; records the size of each pass. A
    /// generation of max_tokens n takes n steps of 20 ms and answers its prompt upper-cased.
    struct Fake {
        passes: Arc<Mutex<Vec<usize>>>,
        computed: Arc<AtomicUsize>,
        steps: Arc<Mutex<Vec<usize>>>,
        /// Lanes for the model "laned".
        lanes: Arc<FakeLanes>,
    }

    /// Two lanes: a text takes 10 ms; counts the texts computed, and the most computed at once.
    #[derive(Default)]
    struct FakeLanes {
        computed: AtomicUsize,
        running: AtomicUsize,
        most: AtomicUsize,
    }

    impl crate::engine::Lanes for FakeLanes {
        fn count(&self) -> usize {
            2
        }

        fn spawn(self: Arc<Self>, work: crate::engine::LaneWork) {
            std::thread::spawn(move || {
                work(&|text: &str| {
                    let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                    self.most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                    self.computed.fetch_add(1, Ordering::SeqCst);
                    self.running.fetch_sub(1, Ordering::SeqCst);
                    Ok(vec![text.len() as f32, text.bytes().next().unwrap_or(0) as f32])
                })
            });
        }
    }

    struct FakeStream {
        left: usize,
        prompt: String,
        steps: usize,
    }

    impl Compute for Fake {
        type Stream = FakeStream;

        fn start(&mut self, req: &GenerateRequest) -> Result<FakeStream, ModelError> {
            if req.prompt == "fail" {
                return Err(ModelError::Invalid("bad prompt".into()));
            }
            Ok(FakeStream { left: req.max_tokens, prompt: req.prompt.clone(), steps: 0 })
        }

        fn step(&mut self, _spec: &ModelSpec, streams: &mut [&mut FakeStream]) -> Result<(), ModelError> {
            std::thread::sleep(Duration::from_millis(20));
            self.steps.lock().unwrap().push(streams.len());
            for s in streams.iter_mut() {
                s.left -= 1;
                s.steps += 1;
            }
            Ok(())
        }

        fn finished(&mut self, _spec: &ModelSpec, s: &FakeStream) -> Option<Result<crate::generate::Generated, ModelError>> {
            (s.left == 0).then(|| {
                Ok(crate::generate::Generated {
                    text: s.prompt.to_uppercase(),
                    prompt_tokens: 0,
                    generated_tokens: s.steps,
                    context_tokens_cut: 0,
                    finish_reason: "length".into(),
                    time_to_first_token_ms: 0.0,
                    total_ms: 0.0,
                })
            })
        }

        fn embed(&mut self, spec: &ModelSpec, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
            if spec.name == "broken" {
                return Err(ModelError::Corrupt { path: spec.path.clone(), detail: "test".into() });
            }
            std::thread::sleep(Duration::from_millis(30));
            self.passes.lock().unwrap().push(texts.len());
            self.computed.fetch_add(texts.len(), Ordering::SeqCst);
            Ok(texts.iter().map(|t| vec![t.len() as f32, t.bytes().next().unwrap_or(0) as f32]).collect())
        }
        fn describe(&self) -> crate::engine::Described {
            crate::engine::Described { device: Some("cpu".into()), models: vec!["fake".into()], embedders: Vec::new() }
        }

        fn lanes(&mut self, spec: &ModelSpec) -> Result<Option<Arc<dyn crate::engine::Lanes>>, ModelError> {
            Ok((spec.name == "laned").then(|| self.lanes.clone() as Arc<dyn crate::engine::Lanes>))
        }
    }

    fn spec(name: &str) -> ModelSpec {
        ModelSpec::new(name, "/nowhere", None, "cpu")
    }

    fn call(path: &std::path::Path, req: &Request) -> Response {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(&encode(req)).unwrap();
        decode(&read_frame(&mut s).unwrap().unwrap()).unwrap()
    }

    fn start() -> (std::path::PathBuf, Arc<Mutex<Vec<usize>>>, Arc<AtomicUsize>) {
        let (path, passes, computed, _, _) = start_with_lanes();
        (path, passes, computed)
    }

    fn start_with_steps() -> (std::path::PathBuf, Arc<Mutex<Vec<usize>>>, Arc<AtomicUsize>, Arc<Mutex<Vec<usize>>>) {
        let (path, passes, computed, steps, _) = start_with_lanes();
        (path, passes, computed, steps)
    }

    #[allow(clippy::type_complexity)]
    fn start_with_lanes() -> (std::path::PathBuf, Arc<Mutex<Vec<usize>>>, Arc<AtomicUsize>, Arc<Mutex<Vec<usize>>>, Arc<FakeLanes>) {
        let dir = std::env::temp_dir().join(format!("lorag-serve-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let passes = Arc::new(Mutex::new(Vec::new()));
        let computed = Arc::new(AtomicUsize::new(0));
        let steps = Arc::new(Mutex::new(Vec::new()));
        let lanes = Arc::new(FakeLanes::default());
        let fake = Fake { passes: passes.clone(), computed: computed.clone(), steps: steps.clone(), lanes: lanes.clone() };
        std::thread::spawn(move || serve(listener, fake));
        (path, passes, computed, steps, lanes)
    }

    #[test]
    fn lanes_take_texts_as_they_free_and_answer_each_request() {
        let (path, passes, _, _, lanes) = start_with_lanes();
        let laned = ModelSpec::new("laned", "/nowhere", None, "cpu");
        // a lone text on idle lanes runs in a pass on all cores
        assert!(matches!(call(&path, &Request::Embed { model: laned.clone(), texts: vec!["one".into()] }), Response::Embeddings(v) if v == vec![vec![3.0, b'o' as f32]]));
        assert_eq!(passes.lock().unwrap().clone(), vec![1]);
        assert_eq!(lanes.computed.load(Ordering::SeqCst), 0);
        // several requests: on the lanes, both busy at once, each request its own answers in order
        let clients: Vec<_> = (0..8u8)
            .map(|c| {
                let (path, laned) = (path.clone(), laned.clone());
                std::thread::spawn(move || {
                    let texts: Vec<String> = (0..3).map(|i| format!("{}{}", (b'a' + c) as char, "y".repeat(i))).collect();
                    (texts.clone(), call(&path, &Request::Embed { model: laned, texts }))
                })
            })
            .collect();
        for client in clients {
            let (texts, response) = client.join().unwrap();
            let Response::Embeddings(v) = response else { panic!("{response:?}") };
            let expected: Vec<Vec<f32>> = texts.iter().map(|t| vec![t.len() as f32, t.as_bytes()[0] as f32]).collect();
            assert_eq!(v, expected);
        }
        assert!(lanes.computed.load(Ordering::SeqCst) >= 21, "the lanes computed {}", lanes.computed.load(Ordering::SeqCst));
        assert_eq!(lanes.most.load(Ordering::SeqCst), 2, "the two lanes ran side by side");
        // a closed connection's texts left on the lanes are not computed
        let before = lanes.computed.load(Ordering::SeqCst);
        {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(&encode(&Request::Embed { model: laned.clone(), texts: vec!["z".into(); 200] })).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(lanes.running.load(Ordering::SeqCst), 0);
        assert!(lanes.computed.load(Ordering::SeqCst) - before < 100, "computed {} texts for nobody", lanes.computed.load(Ordering::SeqCst) - before);
        let Response::Status(st) = call(&path, &Request::Status) else { panic!() };
        assert_eq!(st.queue_depth, 0);
    }

    fn gen(prompt: &str, max_tokens: usize) -> Request {
        Request::Generate(GenerateRequest {
            model: spec("g"),
            prompt: prompt.into(),
            system: None,
            context: vec![],
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            adapter: None,
        })
    }

    #[test]
    fn generations_of_several_connections_are_decoded_in_shared_steps() {
        let (path, _, _, steps) = start_with_steps();
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let path = path.clone();
                std::thread::spawn(move || (c, call(&path, &gen(&format!("client {c}"), 10))))
            })
            .collect();
        // an embedding request is served meanwhile, not after all decoding
        let t = std::time::Instant::now();
        assert!(matches!(call(&path, &Request::Embed { model: spec("m"), texts: vec!["e".into()] }), Response::Embeddings(_)));
        assert!(t.elapsed() < Duration::from_millis(150), "embedding waited for generation: {:?}", t.elapsed());
        for client in clients {
            let (c, response) = client.join().unwrap();
            let Response::Generated(g) = response else { panic!("{response:?}") };
            assert_eq!(g.text, format!("CLIENT {c}"));
            assert_eq!(g.generated_tokens, 10);
        }
        let steps = steps.lock().unwrap().clone();
        assert_eq!(steps.iter().sum::<usize>(), 40);
        assert!(steps.len() < 25, "4 streams of 10 steps were not decoded together: {steps:?}");
        assert!(matches!(call(&path, &gen("fail", 3)), Response::Error(ModelError::Invalid(_))));
    }

    #[test]
    fn a_closed_connection_stops_its_generation() {
        let (path, _, _, steps) = start_with_steps();
        {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(&encode(&gen("long", 10_000))).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        let n = steps.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(steps.lock().unwrap().len(), n, "decoding went on for a closed connection");
        let Response::Status(st) = call(&path, &Request::Status) else { panic!() };
        assert_eq!(st.queue_depth, 0);
    }

    fn rand_suffix() -> u64 {
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn requests_from_several_connections_share_passes_and_get_their_own_answers() {
        let (path, passes, _) = start();
        // Keep the scheduler busy so that the eight requests queue up together.
        let blocker = {
            let path = path.clone();
            std::thread::spawn(move || call(&path, &Request::Embed { model: spec("m"), texts: vec!["x".into(); 40] }))
        };
        std::thread::sleep(Duration::from_millis(10));
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let texts: Vec<String> = (0..3).map(|i| format!("{}{}", (b'a' + c) as char, "y".repeat(i))).collect();
                    (c, texts.clone(), call(&path, &Request::Embed { model: spec("m"), texts }))
                })
            })
            .collect();
        for client in clients {
            let (c, texts, response) = client.join().unwrap();
            let Response::Embeddings(v) = response else { panic!("{response:?}") };
            assert_eq!(v.len(), 3);
            for (t, e) in texts.iter().zip(&v) {
                assert_eq!(e, &vec![t.len() as f32, (b'a' + c) as f32]);
            }
        }
        assert!(matches!(blocker.join().unwrap(), Response::Embeddings(v) if v.len() == 40));
        let passes = passes.lock().unwrap().clone();
        assert!(passes.iter().all(|&n| n <= BATCH), "{passes:?}");
        // 40 + 24 texts: the 24 must not take 8 passes of 3.
        assert!(passes.len() <= 4, "requests were not batched together: {passes:?}");
        let Response::Status(s) = call(&path, &Request::Status) else { panic!() };
        assert_eq!(s.requests_served, 9);
        assert_eq!(s.queue_depth, 0);
        assert_eq!(s.models, vec!["fake".to_string()]);
    }

    #[test]
    fn a_closed_connection_cancels_its_queued_work() {
        let (path, _, computed) = start();
        {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(&encode(&Request::Embed { model: spec("m"), texts: vec!["z".into(); 3200] })).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        } // closed: the backend gave up
        std::thread::sleep(Duration::from_millis(200));
        let Response::Status(s) = call(&path, &Request::Status) else { panic!() };
        assert_eq!(s.queue_depth, 0);
        let done = computed.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(computed.load(Ordering::SeqCst), done, "work went on for a closed connection");
        assert!(done < 3200 / 2, "computed {done} texts for nobody");
        // The server still serves.
        assert!(matches!(call(&path, &Request::Embed { model: spec("m"), texts: vec!["q".into()] }), Response::Embeddings(v) if v.len() == 1));
    }

    #[test]
    fn errors_reach_only_their_requests() {
        let (path, _, _) = start();
        let Response::Error(e) = call(&path, &Request::Embed { model: spec("broken"), texts: vec!["a".into()] }) else { panic!() };
        assert!(matches!(e, ModelError::Corrupt { .. }));
        assert!(matches!(call(&path, &Request::Embed { model: spec("m"), texts: vec![] }), Response::Embeddings(v) if v.is_empty()));
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(decode::<Response>(&read_frame(&mut s).unwrap().unwrap()).unwrap(), Response::Error(_)));
    }
}
