//! The HTTP API (axum): routes, shared state, error shape and serving.
//!
//! Handlers stay thin: they read and validate input, call the write path or
//! the read side, and shape the answer. Every error leaves as a
//! [`problem::Problem`].

pub mod admin;
pub mod assertions;
pub mod body;
pub mod consistency;
pub mod kv;
pub mod lenses;
pub mod middleware;
pub mod problem;
pub mod query;
pub mod readiness;
pub mod search;
pub mod system;

use std::future::Future;

use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::ingest::Ingest;
use crate::model::parse::ParseOptions;
use problem::Problem;

/// Whether this node accepts writes.
#[derive(Clone)]
pub enum Role {
    /// The one writer: owns the log.
    Writer(Ingest),
    /// A read replica following an archive; writes go to the writer.
    Follower(std::sync::Arc<crate::archive::follower::FollowStatus>),
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Writer or follower.
    pub role: Role,
    /// The shipper's progress, when this writer ships its log.
    pub shipping: Option<std::sync::Arc<crate::archive::shipper::ShipStatus>>,
    /// Validation policy.
    pub parse_options: ParseOptions,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The projections.
    pub read: std::sync::Arc<crate::projection::read_side::ReadSide>,
    /// When `/v1/ready` calls a projection lagging.
    pub readiness: std::sync::Arc<readiness::Readiness>,
    /// Whether `/v1/admin/` is served.
    pub admin_enabled: bool,
    /// A follower is not ready after this long without a successful poll.
    pub follow_max_silence: std::time::Duration,
    /// Searches that may run at once (`STEMEDB_SEARCH_THREADS`); the rest
    /// queue in arrival order (tokio's semaphore is fair).
    pub search_slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The last position of the log this node serves: committed (writer)
    /// or downloaded (follower).
    pub fn head(&self) -> u64 {
        match &self.role {
            Role::Writer(i) => i.committed_position(),
            Role::Follower(f) => f.position(),
        }
    }

    /// The write path, or the problem a follower answers to a write.
    pub fn writer(&self) -> Result<&Ingest, Problem> {
        match &self.role {
            Role::Writer(i) => Ok(i),
            Role::Follower(f) => Err(Problem::read_only(f.url())),
        }
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/assertions", post(assertions::create).get(kv::list))
        .route("/v1/assertions/{id}", get(kv::get))
        .route("/v1/history", get(kv::history))
        .route("/v1/lenses/{lens}", get(lenses::query))
        .route("/v1/subjects/{subject}", get(lenses::subject))
        .route("/v1/search", get(search::search))
        .route("/v1/ready", get(system::ready))
        .route("/v1/admin/projections", get(admin::projections))
        .route("/v1/admin/projections/rebuild", post(admin::rebuild))
        .route("/v1/admin/projections/rebuild/{job}", get(admin::job).delete(admin::cancel))
        .route("/v1/admin/projections/verify", post(admin::verify))
        .route("/v1/assertions/batch", post(assertions::create_batch))
        .route("/v1/assertions/{id}/retractions", post(assertions::retract))
        .route("/v1/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .fallback(|req: Request| async move { Problem::no_route(req.uri().path()) })
        .method_not_allowed_fallback(|req: Request| async move { Problem::method_not_allowed(req.method().as_str(), req.uri().path()) })
        .layer(axum::middleware::from_fn(middleware::record_metrics))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
