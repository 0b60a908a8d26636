//! What a store call can fail with, by meaning; `crate::error` maps each to a gRPC status.

/// What went wrong in a store call, by meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The write conflicts with the current state (for example an id that already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The call names a state that is no longer current (for example a partition head that
    /// moved); nothing was written. Look again before retrying.
    #[error("{0}")]
    FailedPrecondition(String),
    /// An argument the store interprets (such as a page token) is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Concurrent writers kept winning an optimistic-concurrency race; nothing was written.
    /// Retrying later can succeed.
    #[error("contention: {0}")]
    Contention(String),
    /// The disk is full: the call may or may not have taken effect (the failure can come while
    /// committing). Retry once space is freed (Publish with the same idempotency key).
    #[error("storage full: {0}")]
    StorageFull(String),
    /// A configured limit (such as the number of subscriptions) would be exceeded; nothing was
    /// written. Retrying helps only once something is removed.
    #[error("{0}")]
    LimitReached(String),
    /// The store has more work queued than it takes; nothing was written. Retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Stored data cannot be decoded: damaged, or written by an incompatible version.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The store cannot be reached or cannot write now; nothing was written. Safe to retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store failed while making the call durable: it may or may not have taken effect.
    /// Retrying is safe for idempotent calls (Publish with an idempotency key).
    #[error("outcome unknown: {0}")]
    Uncertain(String),
    /// The call took effect in part and left a record of what is left, which a retry of the
    /// same call (or the store's own background sweep) finishes.
    #[error("partly done: {0}")]
    Partial(String),
    /// A write fenced by a partition lease was refused because the lease is no longer the
    /// caller's (another worker claimed the partition); nothing was written. Not retryable:
    /// the caller must stop working on the partition.
    #[error("partition lease lost: {0}")]
    LeaseLost(String),
    /// A bug.
    #[error("store internal error: {0}")]
    Internal(String),
}
