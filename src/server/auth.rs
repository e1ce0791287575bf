//! API keys. Every route is registered with an [`Access`] level, and the key is checked by a
//! middleware on that route, after routing has matched it, so no spelling of a path (percent
//! encoding, doubled or trailing slashes, dot segments, case) reaches a handler without its
//! check: a spelling that matches no route ends in 404 or 405 before any handler runs.
//!
//! With `--api-key`, every [`Access::Write`] route needs the key, and with `--protect-reads`
//! every [`Access::Read`] route too (`/metrics` included). [`Access::Open`] routes (the UI,
//! `/healthz`, `/readyz`, the OpenAPI document) never do. [`Access::Moderate`] routes (match
//! lists, the review queue, the audit log) always need the key, and a server without one refuses
//! them (403): every moderation action is recorded with who took it. The key comes as
//! `Authorization: Bearer KEY` or `X-Api-Key: KEY`; GET and HEAD requests may also carry
//! `?api_key=KEY`, because `<img>` tags cannot send headers.

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpMessage, ResponseError};

use super::error::ApiError;
use super::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the UI, health, readiness and the OpenAPI document.
    Open,
    /// A read of the API: needs the key under `--protect-reads`.
    Read,
    /// A write, or work done for the caller on the models (captioning): needs the key
    /// whenever one is set.
    Write,
    /// Moderation (lists, review, audit): needs the key, and a server that has one.
    Moderate,
}

impl Access {
    fn needs_key(self, protect_reads: bool) -> bool {
        match self {
            Self::Open => false,
            Self::Read => protect_reads,
            Self::Write | Self::Moderate => true,
        }
    }
}

/// Whether the request presented the server's key; put in the request's extensions by the
/// route middleware (always `false` when the server has no key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyPresented(pub bool);

/// Who holds `key`, as the audit log names them: `key:` and the first 8 hex digits of its
/// SHA-256 (the key itself is never written down).
pub fn key_id(key: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.as_bytes());
    format!("key:{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// Compares without an early exit, so response time does not reveal a prefix of the key.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented(req: &ServiceRequest) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h.get("authorization").and_then(|v| v.to_str().ok()) {
        if let Some(k) = v.strip_prefix("Bearer ") {
            return Some(k.trim().to_string());
        }
    }
    if let Some(v) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return web::Query::<std::collections::HashMap<String, String>>::from_query(
            req.query_string(),
        )
        .ok()
        .and_then(|q| q.get("api_key").cloned());
    }
    None
}

async fn check(
    access: Access,
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<EitherBody<BoxBody>>, actix_web::Error> {
    let (key, protect_reads) = match req.app_data::<web::Data<AppState>>() {
        Some(state) => (state.settings.api_key.clone(), state.settings.protect_reads),
        // Without the state no handler can run either; refuse rather than guess.
        None => {
            let res = ApiError::internal("the app state is missing").error_response();
            let (http, _) = req.into_parts();
            return Ok(ServiceResponse::new(http, res).map_into_right_body());
        }
    };
    let ok = key
        .as_deref()
        .is_some_and(|key| presented(&req).is_some_and(|k| same(&k, key)));
    req.extensions_mut().insert(KeyPresented(ok));
    if access == Access::Moderate && key.is_none() {
        let res = ApiError::new(
            StatusCode::FORBIDDEN,
            "no_api_key",
            "moderation needs a server started with --api-key: every action is recorded with \
             the key that took it",
        )
        .error_response();
        let (http, _) = req.into_parts();
        return Ok(ServiceResponse::new(http, res).map_into_right_body());
    }
    if key.is_some() && access.needs_key(protect_reads) && !ok {
        let res = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs the API key (Authorization: Bearer KEY)",
        )
        .error_response();
        let (http, _) = req.into_parts();
        return Ok(ServiceResponse::new(http, res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// The middleware that guards one route at `access`: 401 without the key where it is needed.
pub fn guard(
    access: Access,
) -> impl actix_web::dev::Transform<
    actix_service::boxed::BoxService<ServiceRequest, ServiceResponse, actix_web::Error>,
    ServiceRequest,
    Response = ServiceResponse<impl MessageBody>,
    Error = actix_web::Error,
    InitError = (),
> {
    from_fn(move |req: ServiceRequest, next: Next<BoxBody>| check(access, req, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_levels_and_key_comparison() {
        assert!(!Access::Open.needs_key(true));
        assert!(!Access::Read.needs_key(false));
        assert!(Access::Read.needs_key(true));
        assert!(Access::Write.needs_key(false));
        assert!(Access::Moderate.needs_key(false));
        assert_eq!(key_id("secret").len(), "key:".len() + 8);
        assert_ne!(key_id("secret"), key_id("secret2"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
