//! The thread config work runs on: building runtimes, loading and hashing plugin files.
//!
//! Building a runtime reads plugin files, hashes them, opens libraries and compiles every
//! changed API: milliseconds to seconds of CPU and blocking I/O. On a tokio worker that
//! would stall every request scheduled on it (with one worker, all traffic). Jobs run here
//! one at a time, in the order they were sent, so two builds never race.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

pub struct ConfigThread {
    jobs: mpsc::Sender<Job>,
}

/// The config thread is gone: only when it panicked in a job, or at process exit.
#[derive(Debug, thiserror::Error)]
#[error("the config thread has stopped")]
pub struct Stopped;

impl ConfigThread {
    pub fn spawn() -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("gatehouse-config".to_owned()).spawn(move || {
            for job in rx {
                job();
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the config thread; awaiting the answer parks no worker.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Stopped> {
        self.send(f)?.await.map_err(|_| Stopped)
    }

    /// Runs `f` on the config thread and blocks until it is done: for callers that are
    /// themselves on a dedicated thread, never on a tokio worker.
    pub fn run_blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Stopped> {
        self.send(f)?.blocking_recv().map_err(|_| Stopped)
    }

    fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, Stopped> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller may have given up waiting; the work is done either way.
            let _ = tx.send(f());
        });
        self.jobs.send(job).map_err(|_| Stopped)?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_off_the_calling_thread_in_order() {
        let t = ConfigThread::spawn().expect("spawn");
        let caller = std::thread::current().id();
        let (ran_on, first) = t.run(|| (std::thread::current().id(), 1)).await.expect("runs");
        assert_ne!(ran_on, caller);
        let second = t.run(move || first + 1).await.expect("runs");
        assert_eq!(second, 2);
        let name = t.run(|| std::thread::current().name().map(str::to_owned)).await.expect("runs");
        assert_eq!(name.as_deref(), Some("gatehouse-config"));
    }
}
