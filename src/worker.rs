//! The shared model worker (DESIGN.md §2), PostgreSQL's side of it.
//!
//! Processes. With `shared_preload_libraries = 'lorag'`, `_PG_init` registers one background
//! worker, the *supervisor*. It binds a Unix socket in the data directory and forks the *model
//! process*, which serves that socket with `lorag_models::serve` and is the only process that
//! loads models. The model process is the supervisor's child, not the postmaster's: when it
//! crashes or the OOM killer takes it, the postmaster sees nothing and the cluster stays up; the
//! supervisor reaps it and forks a new one (with a growing delay if it keeps dying young).
//! The model process never calls PostgreSQL: it resets the signal handlers it inherited, dies
//! with its parent (`PR_SET_PDEATHSIG`), and leaves through `_exit`.
//!
//! Requests. A backend keeps one connection to the socket. It writes a request and waits on its
//! latch *and* the socket (`WaitLatchOrSocket`), checking for interrupts at every wake-up: query
//! cancel or `statement_timeout` raise the ERROR there, the connection is dropped while the
//! ERROR unwinds, and closing it is the model process's signal to drop that request. If the
//! model process dies, every waiting backend reads end-of-file at once and raises an ERROR.
//!
//! Why a socket and not a shared-memory queue: requests and answers have no size bound (arrays
//! of texts, vectors, generated text), a socket gives back-pressure and an end-of-file in both
//! directions (cancel one way, death the other) for free, and the model process, not being a
//! PostgreSQL process, must not touch PostgreSQL's shared memory anyway.
//!
//! The socket is `pg_dynshmem/lorag_worker.sock` under the data directory: only the server's OS
//! user can connect (the directory is 0700), and base backups skip that directory's contents.

use crate::guc::LORAG_USE_WORKER;
use lorag_models::engine::Engine;
use lorag_models::lorag_lora::train::Progress;
use lorag_models::protocol::{decode, encode, FrameBuffer, Request, Response};
use lorag_models::ModelError;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Relative to the data directory, which is every server process's working directory.
const SOCKET: &str = "pg_dynshmem/lorag_worker.sock";
/// How long a backend waits for the worker to accept a connection (it may be starting).
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Restart delays of the model process: the first, and the most when it keeps crashing.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A model process that lived this long is healthy: its next restart is immediate again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// Set in the postmaster by `_PG_init` under `shared_preload_libraries`; every backend forked
/// from it inherits the value.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Registers the supervisor. Called from `_PG_init` while shared_preload_libraries load.
pub fn register() {
    PRELOADED.store(true, Ordering::Relaxed);
    BackgroundWorkerBuilder::new("lorag model worker")
        .set_type("lorag model worker")
        .set_library("lorag")
        .set_function("lorag_model_worker_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// lorag was preloaded, so the shared worker exists.
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Requests of this session go to the shared worker.
pub fn enabled() -> bool {
    preloaded() && LORAG_USE_WORKER.get()
}

// ---------------------------------------------------------------------------------------------
// The supervisor (a background worker: its main thread is the only one, and talks to PostgreSQL)

/// # Safety
/// Called by the postmaster as the background worker's entry point.
#[pgrx::pg_guard]
#[no_mangle]
pub extern "C-unwind" fn lorag_model_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM | SignalWakeFlags::SIGCHLD);
    let _ = std::fs::remove_file(SOCKET);
    let listener = UnixListener::bind(SOCKET).unwrap_or_else(|e| {
        pgrx::error!("lorag model worker cannot listen on \"{SOCKET}\" in the data directory: {e}")
    });
    pgrx::log!("lorag model worker started: models are served to every connection from one process");
    let mut child: Option<(i32, Instant)> = None;
    let mut delay = RESTART_MIN;
    let mut next_start = Instant::now();
    loop {
        if child.is_none() && Instant::now() >= next_start {
            child = spawn_model_process(&listener).map(|pid| (pid, Instant::now()));
            if child.is_none() {
                next_start = Instant::now() + delay;
            }
        }
        let timeout = if child.is_none() { next_start.saturating_duration_since(Instant::now()) } else { Duration::from_secs(1) };
        if !BackgroundWorker::wait_latch(Some(timeout.max(Duration::from_millis(10)))) {
            break;
        }
        let _ = BackgroundWorker::sighup_received();
        let _ = BackgroundWorker::sigchld_received();
        let Some((pid, started)) = child else { continue };
        let mut status = 0;
        // Safety: plain libc call on our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
            continue;
        }
        let how = if libc::WIFSIGNALED(status) {
            format!("was killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        delay = if started.elapsed() >= HEALTHY_AFTER { RESTART_MIN } else { (delay * 2).min(RESTART_MAX) };
        pgrx::log!("lorag model process {pid} {how}; its requests got an ERROR; starting a new one in {} ms", delay.as_millis());
        next_start = Instant::now() + delay;
        child = None;
    }
    if let Some((pid, _)) = child {
        stop_model_process(pid);
    }
    let _ = std::fs::remove_file(SOCKET);
    // Exit status 1: if this was pg_terminate_backend() and not a shutdown, the postmaster
    // starts the worker again after bgw_restart_time (status 0 would retire it for good).
    // Safety: the ordinary way out of a PostgreSQL process.
    unsafe { pg_sys::proc_exit(1) }
}

/// Forks the model process; in the parent, returns its pid.
fn spawn_model_process(listener: &UnixListener) -> Option<i32> {
    // Safety: the supervisor is single-threaded, so the child starts with one consistent thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        pgrx::warning!("lorag model worker cannot fork the model process: {}", std::io::Error::last_os_error());
        return None;
    }
    if pid == 0 {
        model_process_main(listener);
    }
    Some(pid)
}

fn stop_model_process(pid: i32) {
    // Safety: signals and waitpid on our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 {
            if Instant::now() > deadline {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The model process: forked from the supervisor, never calls PostgreSQL, never returns.
fn model_process_main(listener: &UnixListener) -> ! {
    let parent = std::os::unix::process::parent_id() as i32;
    // Safety: resetting what the fork inherited from a PostgreSQL process, before any thread.
    unsafe {
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGCHLD,
            libc::SIGALRM,
            libc::SIGURG,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_NAME, c"lorag models".as_ptr());
        // One malloc arena for all threads: per-thread arenas hold on to freed activations, and
        // the process's memory grows with the threads that ever computed (measured: 74 MB more
        // from 1 to 8 connections with two arenas, 27 MB with one, at the same throughput).
        libc::mallopt(libc::M_ARENA_MAX, 1);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    // pgrx's panic hook belongs to PostgreSQL processes; this one reports to the server log.
    std::panic::set_hook(Box::new(|info| eprintln!("lorag model process {}: {info}", std::process::id())));
    let code = match listener.try_clone() {
        Ok(listener) => {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lorag_models::serve::serve(listener, Engine::new())));
            1
        }
        Err(e) => {
            eprintln!("lorag model process: cannot use the worker socket: {e}");
            1
        }
    };
    // Safety: leave without running the exit handlers inherited from PostgreSQL.
    unsafe { libc::_exit(code) }
}

// ---------------------------------------------------------------------------------------------
// The backend's side

thread_local! {
    static CONNECTION: std::cell::RefCell<Option<UnixStream>> = const { std::cell::RefCell::new(None) };
}

fn raise_transport(code: pgrx::PgSqlErrorCode, message: String, hint: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "lorag").set_hint(hint).report(pgrx::PgLogLevel::ERROR);
    unreachable!()
}

/// Sleeps on this backend's latch for up to `ms`, with `events` on `fd` (if any), then takes
/// any pending interrupt (cancel, statement_timeout, termination) as an ERROR.
fn wait(events: u32, fd: i32, ms: i64) {
    // Safety: MyLatch is this backend's own latch; called from the main thread.
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH | events) as i32,
            fd,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// A connection to the model process: the cached one if it is still open, else a new one
/// (waiting, interruptibly, while the worker starts).
fn connection() -> UnixStream {
    if let Some(stream) = CONNECTION.with(|c| c.borrow_mut().take()) {
        let mut probe = [0u8; 1];
        // Safety: a non-blocking peek of one byte into a local buffer.
        let n = unsafe {
            libc::recv(stream.as_raw_fd(), probe.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        };
        // Open and idle: no data, no end-of-file. Anything else means the process it led to is gone.
        if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::WouldBlock {
            return stream;
        }
    }
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        match UnixStream::connect(SOCKET) {
            Ok(stream) => {
                stream.set_nonblocking(true).unwrap_or_else(|e| pgrx::error!("lorag: socket setup failed: {e}"));
                return stream;
            }
            Err(e) if Instant::now() < deadline && matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                wait(0, pg_sys::PGINVALID_SOCKET, 100);
            }
            Err(e) => raise_transport(
                pgrx::PgSqlErrorCode::ERRCODE_CANNOT_CONNECT_NOW,
                format!("the lorag model worker is not running ({e})"),
                "It starts with the server when lorag is in shared_preload_libraries; see the server log. \
                 SET lorag.use_worker = off runs models inside this connection instead.",
            ),
        }
    }
}

fn died(detail: String) -> ! {
    crate::models::raise(ModelError::WorkerDied(detail))
}

/// Forgets the cached connection: the model process sees it close and drops whatever job it
/// held for this backend (called when a transaction that opened a job aborts).
pub fn disconnect() {
    CONNECTION.with(|c| c.borrow_mut().take());
}

/// Sends `request` to the model process and waits for its answer, interruptibly.
pub fn call(request: &Request) -> Response {
    call_with_progress(request, &mut |_| {})
}

/// As [`call`], handing the progress reports sent before the answer to `progress`.
pub fn call_with_progress(request: &Request, progress: &mut dyn FnMut(&Progress)) -> Response {
    let mut stream = connection();
    let fd = stream.as_raw_fd();
    let frame = encode(request);
    let mut written = 0;
    let mut incoming = FrameBuffer::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        while written < frame.len() {
            match stream.write(&frame[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => died(e.to_string()),
            }
        }
        loop {
            match stream.read(&mut buf) {
                Ok(0) => died("connection closed".into()),
                Ok(n) => incoming.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => died(e.to_string()),
            }
        }
        loop {
            match incoming.next_frame() {
                Ok(Some(body)) => match decode::<Response>(&body).unwrap_or_else(|e| died(e.to_string())) {
                    Response::Progress(p) => progress(&p),
                    response => {
                        CONNECTION.with(|c| *c.borrow_mut() = Some(stream));
                        return response;
                    }
                },
                Ok(None) => break,
                Err(e) => died(e.to_string()),
            }
        }
        let events = if written < frame.len() { pg_sys::WL_SOCKET_WRITEABLE } else { pg_sys::WL_SOCKET_READABLE };
        // An ERROR here (cancel, timeout) drops `stream`: the model process drops the request.
        wait(events, fd, 1000);
    }
}
