//! Status, health, readiness, metrics and the OpenAPI document.

use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{Endpoint, PathView};
use crate::server::error::{ApiError, ApiResult};
use crate::server::state::AppState;

/// The OpenAPI 3 description of the API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Registers the system routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/api/status").get(status).register(cfg);
    Endpoint::new("/api/openapi.json")
        .get(openapi)
        .register(cfg);
    Endpoint::new("/healthz").get(healthz).register(cfg);
    Endpoint::new("/readyz").get(readyz).register(cfg);
    Endpoint::new("/metrics").get(metrics).register(cfg);
}

async fn status(state: web::Data<AppState>, view: PathView) -> ApiResult<HttpResponse> {
    let s = state.clone();
    let (images, attributes) =
        web::block(move || -> ApiResult<_> { Ok((s.engine.len()?, s.engine.info()?.attributes)) })
            .await??;
    let ing = &state.ingest;
    let p = &ing.progress;
    let st = &state.settings;
    Ok(HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "images": images,
        // What the collection's products say, by attribute name: what filters and facets take.
        "attributes": attributes,
        "folders": st.folders.iter().map(|f| view.show(&f.display().to_string())).collect::<Vec<_>>(),
        "ingest": {
            "state": ing.state.lock().map(|g| *g).ok(),
            "done": p.done.load(Ordering::SeqCst),
            "total": p.total.load(Ordering::SeqCst),
            "failed": p.failed.load(Ordering::SeqCst),
            "current": p.current.lock().ok().and_then(|g| g.as_deref().map(|c| view.show(c))),
            "last_error": ing.last_error.lock().ok().and_then(|g| g.clone()),
            "last_run_unix": ing.last_run_unix.lock().ok().and_then(|g| *g),
            "last_summary": ing.last_summary.lock().ok().and_then(|g| g.clone()).map(|mut s| {
                for f in &mut s.failed {
                    f.path = view.show(&f.path);
                }
                s
            }),
        },
        "models": { "retrieval": st.retrieval_model, "caption": st.caption_model },
        "device": st.device,
        "queue": { "capacity": state.queue.capacity(), "waiting": state.queue.waiting() },
        "limits": {
            "max_upload_bytes": st.max_upload_bytes,
            "max_megapixels": st.limits.max_pixels as f64 / 1e6,
        },
        "auth": { "writes": st.api_key.is_some(), "reads": st.api_key.is_some() && st.protect_reads },
    })))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

async fn readyz(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    if !state.queue.is_alive() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the inference worker is not running",
        ));
    }
    if state.engine.len().is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the collection is unavailable",
        ));
    }
    Ok(HttpResponse::Ok().content_type("text/plain").body("ready"))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
