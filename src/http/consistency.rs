//! Read-your-writes: hold a read until the projections it uses have
//! applied the client's `min_position`, or answer 503 with `Retry-After`.

use axum::http::StatusCode;

use super::AppState;
use super::problem::Problem;
use super::query::Params;

/// Waits as `params` ask (if they do) for the named projections.
pub async fn wait(st: &AppState, params: &Params, projections: &[&str]) -> Result<(), Problem> {
    for name in projections {
        if let Some(why) = st.read.stale(name) {
            return Err(Problem::new(StatusCode::SERVICE_UNAVAILABLE, "stale-projection", "Projection needs a rebuild", why)
                .with("projection", *name)
                .retry_after(30));
        }
    }
    let Some((position, timeout)) = params.consistency()? else { return Ok(()) };
    let head = st.head();
    if position > head {
        // Waiting cannot help for a position the log has not reached; this
        // is a client error unless a write is in flight, so still wait.
        tracing::debug!(position, head, "min_position beyond the committed head");
    }
    st.read.wait_for(projections, position, timeout).await.map_err(|(name, at)| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-caught-up",
            "Projection has not caught up",
            format!("projection {name} has applied position {at}, not yet {position}, after {} ms; retry", timeout.as_millis()),
        )
        .with("projection", name)
        .with("applied_position", at)
        .retry_after(1)
    })
}
