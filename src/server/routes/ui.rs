//! The web UI: the files of `web/`, embedded in the binary so that one file runs anywhere.

use actix_web::{web, HttpResponse};

use super::Endpoint;
use crate::server::error::{ApiError, ApiResult};

/// (name, content type, bytes) of every UI file.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../web/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../web/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../../web/favicon.svg"),
    ),
];

/// What the UI may load: only itself and the API (and blob: URLs of dropped images).
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; \
                   style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Registers `/` and `/assets/{file}`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    Endpoint::new("/").get(index).register(cfg);
    Endpoint::new("/assets/{file}").get(asset).register(cfg);
}

fn serve(name: &str) -> ApiResult<HttpResponse> {
    let (_, mime, bytes) = FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| ApiError::not_found(format!("no UI file {name:?}")))?;
    Ok(HttpResponse::Ok()
        .content_type(*mime)
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(*bytes))
}

async fn index() -> ApiResult<HttpResponse> {
    serve("index.html")
}

async fn asset(file: web::Path<String>) -> ApiResult<HttpResponse> {
    serve(&file)
}
