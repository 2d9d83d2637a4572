//! Thread per core: clients are served by `--workers` threads, each running a
//! current-thread tokio runtime that accepts from a listener of its own on the shared
//! address (`SO_REUSEPORT`: the kernel spreads new connections over them by their
//! addresses and ports).
//!
//! Why not one multi-thread runtime: its scheduler pays atomics and cross-thread wake-ups
//! on every task switch, and a connection's task, its upstream connection's task and the
//! response body could run on different threads, each hand-off a cache miss or a wake-up.
//! Here a client connection, its requests and the upstream connections they use stay on
//! one thread (`pool` keeps idle upstream connections per worker, see `index`).
//!
//! Worker 0 is the thread that called `run`: it also runs what is not a client's
//! (config source, admin port, Redis batching, pool reapers).

use std::{cell::Cell, future::Future, io, net::SocketAddr, num::NonZeroUsize, sync::OnceLock, thread::JoinHandle};

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

/// `n` listening sockets on `addr`, all in one `SO_REUSEPORT` group. Port 0 is resolved
/// by the first; the others join it. Only sockets of the same user can join a group, so
/// another user's process cannot take a share of the connections.
pub fn listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listener(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(listener(bound)?);
    }
    Ok(all)
}

fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Starts workers `1..`, one per element of `inputs` (worker `i` gets `inputs[i - 1]`),
/// each on its own thread with a current-thread runtime, running `serve(i, input)` until
/// it returns.
pub fn spawn<T, F, Fut>(inputs: Vec<T>, serve: F) -> io::Result<Vec<JoinHandle<()>>>
where
    T: Send + 'static,
    F: Fn(usize, T) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()>,
{
    let mut threads = Vec::new();
    for (i, input) in (1..).zip(inputs) {
        let serve = serve.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        threads.push(std::thread::Builder::new().name(format!("gatehouse-worker-{i}")).spawn(move || {
            INDEX.with(|c| c.set(i));
            rt.block_on(serve(i, input));
            // Draining ended in `serve`; blocking work left (a file read) must not hold
            // the process.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })?);
    }
    Ok(threads)
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
    fn each_worker_thread_knows_its_index() {
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = spawn(vec!["a", "b"], move |i, input| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((i, index(), input));
            }
        })
        .expect("spawn");
        for t in threads {
            t.join().expect("worker");
        }
        let mut seen: Vec<(usize, usize, &str)> = rx.try_iter().collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![(1, 1, "a"), (2, 2, "b")]);
        assert_eq!(index(), 0);
    }
}
