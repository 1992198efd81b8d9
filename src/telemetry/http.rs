//! The metrics listener: `/metrics` and `/metrics.json` over HTTP/1,
//! bounded in connections and time.

use std::sync::Arc;
use std::time::Duration;

use super::{OPENMETRICS, Telemetry, prometheus};
use crate::metrics::event;

/// Most connections the metrics listener serves at once. A scraper needs
/// one; beyond this a new connection is closed at once (counted), so a
/// flood of connections holds at most this many descriptors and tasks.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest a client may take to send a request's headers before its
/// connection is closed (counted): a half-sent request holds a slot only
/// this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one connection lives, whatever it does (a slow reader of a
/// large report included).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections refused or cut, logged per minute (the rest counted).
static LISTENER_LOGGED: crate::throttle::Throttle = crate::throttle::Throttle::per_minute(3);

/// Serves `/metrics` and `/metrics.json` on `listener` until `shutdown`,
/// at most [`MAX_CONNECTIONS`] at a time, each within [`HEADER_TIMEOUT`]
/// and [`CONNECTION_TIMEOUT`]; what is refused or cut is counted in
/// `metrics`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    metrics: Arc<crate::metrics::Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use crate::metrics::Metrics;
    use axum::routing::get;
    let report = |t: Arc<Telemetry>| async move {
        tokio::task::spawn_blocking(move || t.report())
            .await
            .expect("report task")
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let t = telemetry.clone();
                move || async move {
                    let r = report(t).await;
                    (
                        [(axum::http::header::CONTENT_TYPE, OPENMETRICS)],
                        prometheus(r),
                    )
                }
            }),
        )
        .route(
            "/metrics.json",
            get({
                let t = telemetry.clone();
                move || async move {
                    let json = serde_json::to_vec(&report(t).await).expect("report JSON");
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json,
                    )
                }
            }),
        );
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = crate::shutdown::stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                if let Some(not_logged) = LISTENER_LOGGED.admit() {
                    tracing::warn!(error = %e, not_logged, "the metrics listener cannot accept a connection");
                }
                tokio::select! {
                    _ = crate::shutdown::stopped(&mut shutdown) => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            event!(
                metrics.metrics_connections_refused,
                warn,
                throttle = LISTENER_LOGGED,
                max = MAX_CONNECTIONS,
                "the metrics listener is serving its most connections: a new one is closed"
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // The connection owns the socket, and lives (pinned here) until
            // the end of this task: whoever sees it closed sees it counted.
            let mut connection = std::pin::pin!(connection);
            let cut = match tokio::time::timeout(CONNECTION_TIMEOUT, connection.as_mut()).await {
                Ok(Ok(())) => false,
                Ok(Err(e)) => e.is_timeout(),
                Err(_) => true,
            };
            if cut {
                Metrics::add(&metrics.metrics_connections_cut, 1);
            }
        });
    }
    connections.shutdown().await;
}
