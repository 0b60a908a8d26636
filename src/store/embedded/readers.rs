//! The reader threads: a fixed pool that runs the store's reads, which redb makes synchronous.
//!
//! Reads used to run on tokio's blocking pool behind a semaphore of eight permits.
//! A permit is released before its thread is idle again, so the next read often found no idle
//! thread and tokio started another: under delivery load the pool grew to some 75 threads, each
//! with its own allocator caches and stack. A fixed pool keeps the threads (and their caches)
//! warm and their number bounded (`--store-readers`: one per core, at least two, by default).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, mpsc};

use tokio::sync::oneshot;

use crate::store::StoreError;

/// A read queued for the pool.
type Job = Box<dyn FnOnce() + Send>;

/// Threads that run queued reads, each in turn; they stop once the pool is closed (or
/// dropped) and the reads already queued are done.
pub(super) struct ReaderPool {
    /// `None` once closed.
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ReaderPool {
    /// Starts `threads` reader threads.
    pub(super) fn start(threads: usize) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut handles = Vec::with_capacity(threads);
        for number in 0..threads {
            let queue = queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("herald-store-reader-{number}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = queue.lock().expect("reader queue lock").recv();
                        match job {
                            Ok(job) => job(),
                            Err(mpsc::RecvError) => break,
                        }
                    }
                })
                .map_err(|error| {
                    StoreError::Internal(format!("cannot start a store reader thread: {error}"))
                })?;
            handles.push(handle);
        }
        Ok(ReaderPool {
            jobs: Some(jobs),
            threads: handles,
        })
    }

    /// Lets the threads finish the reads already queued, and waits for them: after this no
    /// read holds the database any more. Reads asked for later answer `Unavailable`.
    pub(super) fn close(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// Runs `read` on a reader thread and waits for its result. A read that panics answers
    /// `Internal` and leaves its thread running.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, response) = oneshot::channel();
        let job: Job = Box::new(move || {
            // Its caller went away (cancelled) while it waited: nothing to read for.
            if reply.is_closed() {
                return;
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(read))
                .unwrap_or_else(|_| Err(StoreError::Internal("a store read panicked".into())));
            // A caller that went away (cancelled) needs no answer.
            let _ = reply.send(result);
        });
        let stopped = || StoreError::Unavailable("the store's readers stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        response.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_reads_on_its_own_threads_and_survives_a_panic() {
        let pool = ReaderPool::start(2).unwrap();
        let name = pool
            .run(|| Ok(std::thread::current().name().map(str::to_string)))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("herald-store-reader-"));

        let error = pool
            .run(|| -> Result<(), StoreError> { panic!("boom") })
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::Internal(_)), "{error:?}");

        // Both threads still answer, concurrently.
        let (first, second) = tokio::join!(pool.run(|| Ok(1)), pool.run(|| Ok(2)));
        assert_eq!((first.unwrap(), second.unwrap()), (1, 2));

        // Closing waits for the threads; later reads are refused, not lost.
        let mut pool = pool;
        pool.close();
        assert!(pool.threads.is_empty());
        let error = pool.run(|| Ok(3)).await.unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    }
}
