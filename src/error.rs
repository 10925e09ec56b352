//! The one error type. Each variant names the step that failed; none carries a token or a secret
//! (Kubernetes API errors name fields, never Secret values).

/// Anything that stops a reconcile or the process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a Secret failed.
    #[error("reading Secret {namespace}/{name}: {source}")]
    ReadSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing the grant-state Secret failed; the new state is kept in memory and retried.
    #[error("writing grant state Secret {namespace}/{name} (kept in memory, retried): {source}")]
    WriteGrantState {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing the published Secret failed.
    #[error("writing published Secret {namespace}/{name}: {source}")]
    WritePublishedSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing a status failed.
    #[error("updating status of {kind} {name}: {source}")]
    WriteStatus {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Reading a Namespace (for `allowedNamespaces.selector`) failed.
    #[error("reading Namespace {name}: {source}")]
    ReadNamespace {
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// An object the operator watches has no namespace where it must have one.
    #[error("{kind} {name} has no namespace")]
    MissingNamespace {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// Building a request body failed.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What.
        what: &'static str,
        /// Cause.
        source: serde_json::Error,
    },
    /// Connecting to Kubernetes failed at start.
    #[error("connecting to Kubernetes: {0}")]
    Connect(#[source] kube::Error),
    /// The HTTP server failed.
    #[error("HTTP server on {address}: {source}")]
    Serve {
        /// Listen address.
        address: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    WriteFile {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The relay could not start (the step is in the text).
    #[error("relay: {0}")]
    Relay(String),
    /// The relay signing key could not be read or created (see docs/relay.md, security model).
    #[error("relay signing key Secret {namespace}/{name}: {why}")]
    RelaySigningKey {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What went wrong (no key material).
        why: String,
    },
    /// Printing the CRDs failed.
    #[error("rendering CRDs: {0}")]
    Crds(#[source] serde_yaml::Error),
    /// Joining leader election failed at start (the Lease could not be read or created).
    #[error("joining leader election (Lease): {0}")]
    Election(String),
    /// Leadership was lost before a token request or a revocation; the replica that leads now
    /// does it.
    #[error("not leading any more; the leading replica takes over")]
    NotLeader,
    /// A reconcile panicked (a bug); the object is retried later.
    #[error("the reconcile panicked (a bug: please report it); retried in a few minutes")]
    Panicked,
    /// The grant-state Secret was written by someone else (another replica, a person) after it
    /// was read, with a grant this reconcile did not start from: ours is stale and is not written.
    #[error(
        "grant state Secret {namespace}/{name} changed since it was read; this replica's result is stale and dropped"
    )]
    StaleGrantState {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A Secret of someone else has the grant state's name: a new grant state holding a refresh
    /// token is kept in memory (never written over it, never dropped) until the name is free.
    #[error(
        "a Secret of someone else has the grant state's name {namespace}/{name}; the new grant state is kept in \
         memory until it is deleted or renamed"
    )]
    GrantStateTaken {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The provider's rate limit, a `Retry-After` or its lane of concurrent requests has no room
    /// now: the reconcile gives its slot back and comes back then.
    #[error("the provider has no room for a request now; retried in {0:?}")]
    Deferred(std::time::Duration),
    /// A reconcile ran past its deadline and was cancelled.
    #[error("the reconcile ran past its deadline of {0:?} and was cancelled; retried")]
    TimedOut(std::time::Duration),
}

impl Error {
    /// Whether a write lost an optimistic-concurrency race (HTTP 409): the object changed since
    /// it was read, so the reconcile is retried from a fresh copy.
    /// A bounded name of the failing step, for the reconcile metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ReadSecret { .. } => "read_secret",
            Error::WriteGrantState { .. } => "write_grant_state",
            Error::WritePublishedSecret { .. } => "write_published_secret",
            Error::WriteStatus { .. } => "write_status",
            Error::ReadNamespace { .. } => "read_namespace",
            Error::MissingNamespace { .. } => "missing_namespace",
            Error::Encode { .. } => "encode",
            Error::Connect(_) => "connect",
            Error::Serve { .. } => "serve",
            Error::WriteFile { .. } => "write_file",
            Error::Crds(_) => "crds",
            Error::Relay(_) => "relay",
            Error::RelaySigningKey { .. } => "relay_signing_key",
            Error::Election(_) => "election",
            Error::NotLeader => "not_leader",
            Error::Panicked => "panicked",
            Error::StaleGrantState { .. } => "stale_grant_state",
            Error::GrantStateTaken { .. } => "grant_state_taken",
            Error::Deferred(_) => "deferred",
            Error::TimedOut(_) => "timed_out",
        }
    }

    pub fn is_conflict(&self) -> bool {
        match self {
            Error::WriteStatus { source: kube::Error::Api(status), .. } => status.code == 409,
            _ => false,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
