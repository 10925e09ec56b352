//! The operator's HTTP endpoints: `/healthz` (the process answers) and `/readyz` (every cache
//! has synced) on the listen address, and the authorization listener ([`authorize`]) on its own.

pub mod authorize;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::error::{Error, Result};

/// The router.
pub fn router(ready: Arc<AtomicBool>) -> Router {
    Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz)).with_state(ready)
}

async fn readyz(State(ready): State<Arc<AtomicBool>>) -> (StatusCode, &'static str) {
    if ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    address: SocketAddr,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let serve_error = |source| Error::Serve { address: address.to_string(), source };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(serve_error)?;
    tracing::info!(%address, "serving /healthz and /readyz");
    axum::serve(listener, router(ready)).with_graceful_shutdown(shutdown).await.map_err(serve_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(ready: bool, path: &str) -> StatusCode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let app = router(Arc::new(AtomicBool::new(ready)));
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
    }
}
