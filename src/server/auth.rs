//! API keys: with `--api-key`, every write needs the key, and with `--protect-reads` every read
//! of the API, `/metrics` included. The UI, `/healthz` and `/readyz` stay open. The key comes as
//! `Authorization: Bearer KEY` or `X-Api-Key: KEY`; GET requests may also carry `?api_key=KEY`,
//! because `<img>` tags cannot send headers.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::error::ApiError;
use super::state::AppState;

/// Whether a request changes the collection (or spends model time for a caller: captioning).
fn is_write(method: &Method, path: &str) -> bool {
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => false,
        // Searching by an uploaded image is a read that happens to need a body.
        _ => path != "/api/search/image",
    }
}

fn needs_key(method: &Method, path: &str, protect_reads: bool) -> bool {
    let api = path.starts_with("/api/") || path == "/api" || path == "/metrics";
    if !api || path == "/api/openapi.json" {
        return false;
    }
    is_write(method, path) || protect_reads
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
    if req.method() == Method::GET {
        return web::Query::<std::collections::HashMap<String, String>>::from_query(
            req.query_string(),
        )
        .ok()
        .and_then(|q| q.get("api_key").cloned());
    }
    None
}

/// Middleware: refuses requests that need the key and lack it (401).
pub async fn require_key<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if let Some(state) = req.app_data::<web::Data<AppState>>() {
        if let Some(key) = &state.settings.api_key {
            if needs_key(req.method(), req.path(), state.settings.protect_reads) {
                let ok = presented(&req).is_some_and(|k| same(&k, key));
                if !ok {
                    let res = ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "this endpoint needs the API key (Authorization: Bearer KEY)",
                    )
                    .error_response();
                    let (http, _) = req.into_parts();
                    return Ok(ServiceResponse::new(http, res).map_into_right_body());
                }
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_writes_and_reads() {
        assert!(needs_key(&Method::POST, "/api/images", false));
        assert!(needs_key(&Method::DELETE, "/api/images/3", false));
        assert!(needs_key(&Method::POST, "/api/caption", false));
        assert!(!needs_key(&Method::POST, "/api/search/image", false));
        assert!(needs_key(&Method::POST, "/api/search/image", true));
        assert!(!needs_key(&Method::GET, "/api/search", false));
        assert!(needs_key(&Method::GET, "/api/search", true));
        assert!(needs_key(&Method::GET, "/metrics", true));
        assert!(!needs_key(&Method::GET, "/", true));
        assert!(!needs_key(&Method::GET, "/healthz", true));
        assert!(!needs_key(&Method::GET, "/api/openapi.json", true));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
