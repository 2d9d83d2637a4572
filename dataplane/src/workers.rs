//! Thread per core: clients are served by `--workers` threads, each running a
//! current-thread tokio runtime that accepts from a listener of its own on the shared
//! address (`SO_REUSEPORT`: the kernel spreads new connections over them by their
//! addresses and ports).
//!
//! Why not one multi-thread runtime: its scheduler pays atomics and cross-thread wake-ups
//! on every task switch, and a connection's task, its upstream connection's task and the
//! response body could run on different threads, each hand-off a cache miss or a wake-up.
//! Here a client connection, its requests and the `http://` upstream connections they use
//! stay on one thread (`pool` keeps idle upstream connections per worker, see `index`).
//! h2c and `https://` upstream clients are shared: their connections are driven by the
//! worker that opened them and may carry other workers' requests, so a worker's runtime
//! lives until every worker has drained (`Workers::finish`).
//!
//! Worker 0 is the thread that called `run`: it also runs what is not a client's (config
//! source, admin port, the Redis client and its batcher). A hook that blocks stalls the
//! connections of its worker, and on worker 0 these too.

use std::{
    cell::Cell, future::Future, io, net::SocketAddr, num::NonZeroUsize, sync::OnceLock, thread::JoinHandle,
    time::Duration,
};

use tokio::sync::{mpsc, watch};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

static COUNT: OnceLock<usize> = OnceLock::new();

/// The worker this thread is (0 on worker 0 and on threads that are not workers).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers this process serves with (1 until `set_count`).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// Fixed once, before anything that keeps per-worker state (`pool`) is made.
pub fn set_count(n: usize) {
    let _ = COUNT.set(n.max(1));
}

/// One worker per CPU this process may use (affinity and cgroup CPU quota included).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// `n` listening sockets on `addr`, all in one `SO_REUSEPORT` group (for one worker, a
/// plain socket: a second process on the address then fails to bind, as it should). Port 0
/// is resolved by the first; the others join it. Only sockets of the same user can join a
/// group, so another user's process cannot take a share of the connections.
pub fn listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let shared = n > 1;
    let first = listener(addr, shared)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listener(bound, shared)?);
    }
    Ok(all)
}

fn listener(addr: SocketAddr, shared: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The workers on threads of their own, and what tells `run` when they stopped serving.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    /// Serving futures (on worker threads, and the caller's from `track`) not yet ended.
    running: usize,
    ended_tx: mpsc::UnboundedSender<usize>,
    ended: mpsc::UnboundedReceiver<usize>,
    release: watch::Sender<bool>,
}

/// Sends its worker's index when dropped: when the worker's serving returned, or unwound.
struct Ended(usize, mpsc::UnboundedSender<usize>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// Starts workers `1..`, one per element of `inputs` (worker `i` gets `inputs[i - 1]`),
/// each on its own thread with a current-thread runtime, running `serve(i, input)`.
pub fn spawn<T, F, Fut>(inputs: Vec<T>, serve: F) -> io::Result<Workers>
where
    T: Send + 'static,
    F: Fn(usize, T) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()>,
{
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    let mut workers = Workers { threads: Vec::new(), running: 0, ended_tx, ended, release };
    for (i, input) in (1..).zip(inputs) {
        let (serve, ended, mut released) = (serve.clone(), Ended(i, workers.ended_tx.clone()), released.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        workers.threads.push(std::thread::Builder::new().name(format!("gatehouse-worker-{i}")).spawn(move || {
            INDEX.with(|c| c.set(i));
            rt.block_on(async move {
                serve(i, input).await;
                drop(ended);
                // Upstream connections this runtime drives may carry other workers'
                // requests (h2c and TLS clients are shared): they stay until every worker
                // has drained.
                let _ = released.wait_for(|r| *r).await;
            });
            // Blocking work left (a file read) must not hold the process.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })?);
        workers.running += 1;
    }
    Ok(workers)
}

impl Workers {
    /// `serve`, run by the caller as worker `i`, counted like the workers' own.
    pub fn track<Fut: Future<Output = ()>>(&mut self, i: usize, serve: Fut) -> impl Future<Output = ()> + use<Fut> {
        self.running += 1;
        let ended = Ended(i, self.ended_tx.clone());
        async move {
            serve.await;
            drop(ended);
        }
    }

    /// The next worker to stop serving. Before shutdown, one that stopped has failed (its
    /// listener is closed); never resolves while all serve.
    pub async fn stopped(&mut self) -> usize {
        let i = self.ended.recv().await;
        self.running = self.running.saturating_sub(1);
        // `self` holds a sender: the channel never closes.
        i.unwrap_or_default()
    }

    /// Once serving was told to stop: waits up to `within` for every worker to drain, then
    /// lets their runtimes end and joins the threads. A worker still busy past it (a
    /// blocking plugin call, say) is left behind: the process is about to exit.
    pub async fn finish(mut self, within: Duration) {
        let drained = async {
            while self.running > 0 {
                self.stopped().await;
            }
        };
        if tokio::time::timeout(within, drained).await.is_err() {
            tracing::warn!(
                workers = self.running,
                "workers still draining past the drain timeout; exiting without them"
            );
            return;
        }
        let _ = self.release.send(true);
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || threads.into_iter().filter_map(|t| t.join().err()).count());
        match tokio::time::timeout(Duration::from_secs(2), joined).await {
            Ok(Ok(0)) => {}
            Ok(Ok(panicked)) => tracing::error!(panicked, "worker threads panicked"),
            _ => tracing::warn!("worker threads did not end; exiting without them"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_share_one_port_even_when_asked_for_any() {
        let all = listeners("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        let ports: Vec<u16> = all.iter().map(|l| l.local_addr().expect("addr").port()).collect();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != 0 && ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    }

    #[test]
    fn a_port_in_use_outside_the_group_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        assert!(listeners(addr, 2).is_err());
    }

    #[test]
    fn one_worker_binds_alone_so_a_second_process_on_its_address_is_refused() {
        let one = listeners("127.0.0.1:0".parse().expect("addr"), 1).expect("bind");
        let addr = one[0].local_addr().expect("addr");
        assert!(listeners(addr, 1).is_err());
        assert!(listeners(addr, 2).is_err());
    }

    #[test]
    fn a_drained_worker_keeps_driving_its_tasks_until_every_worker_has_drained() {
        use std::io::Read;
        use tokio::io::AsyncWriteExt;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let mut workers = spawn(vec![addr_tx], |_, addr_tx| async move {
            // A task on this worker's runtime, as an upstream connection it drives would be;
            // then this worker's serving ends at once.
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let _ = addr_tx.send(l.local_addr().expect("addr"));
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.write_all(b"hi").await;
                }
            });
        })
        .expect("spawn");
        let addr = addr_rx.recv_timeout(Duration::from_secs(20)).expect("the worker's address");
        assert_eq!(rt.block_on(workers.stopped()), 1, "worker 1 is done serving");
        let mut answer = [0u8; 2];
        let mut s = std::net::TcpStream::connect(addr).expect("still served");
        s.read_exact(&mut answer).expect("answered");
        assert_eq!(&answer, b"hi");
        rt.block_on(workers.finish(Duration::from_secs(20)));
        assert!(std::net::TcpStream::connect(addr).is_err(), "gone with its runtime once all had drained");
    }

    #[test]
    fn each_worker_thread_knows_its_index() {
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = spawn(vec!["a", "b"], move |i, input| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((i, index(), input));
            }
        })
        .expect("spawn");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(workers.finish(Duration::from_secs(20)));
        let mut seen: Vec<(usize, usize, &str)> = rx.try_iter().collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![(1, 1, "a"), (2, 2, "b")]);
        assert_eq!(index(), 0);
    }
}
