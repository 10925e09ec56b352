//! The operator's HTTP endpoints: `/healthz` (the process answers), `/readyz` (every cache has
//! synced) and `/metrics` (see [`crate::metrics`]) on the listen address, and the authorization
//! listener ([`authorize`]) on its own.

pub mod authorize;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::error::{Error, Result};

/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    /// Every cache has synced.
    pub ready: Arc<AtomicBool>,
    /// What `/metrics` encodes.
    pub registry: Arc<prometheus_client::registry::Registry>,
}

/// The router.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

async fn metrics(State(admin): State<Admin>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match crate::metrics::encode(&admin.registry) {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    address: SocketAddr,
    admin: Admin,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let serve_error = |source| Error::Serve { address: address.to_string(), source };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(serve_error)?;
    // Bounded like the authorization listener's: whoever reaches this port cannot take the file
    // descriptors the apiserver and token connections need.
    let listener = authorize::Connections::new(listener, 64, std::time::Duration::from_secs(90));
    tracing::info!(%address, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router(admin)).with_graceful_shutdown(shutdown).await.map_err(serve_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(ready: bool, path: &str) -> StatusCode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let registry = crate::metrics::registry(&crate::metrics::Metrics::default());
        let app = router(Admin { ready: Arc::new(AtomicBool::new(ready)), registry: Arc::new(registry) });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap_or_else(|e| panic!("{e}"));
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT)
    }

    #[tokio::test]
    async fn readyz_answers_503_until_the_caches_have_synced_and_healthz_always_200() {
        assert_eq!(get_status(false, "/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get_status(true, "/readyz").await, StatusCode::OK);
        assert_eq!(get_status(false, "/healthz").await, StatusCode::OK);
        assert_eq!(get_status(false, "/metrics").await, StatusCode::OK);
    }
}
