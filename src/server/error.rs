//! API errors: every failure becomes `{"error":{"code":..,"message":..}}` with its status, in
//! this one place.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::{EngineError, ErrorKind};

/// An error answered to an API client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, `snake_case`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413: the upload is too big (bytes or pixels).
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 415: not a media type this endpoint takes.
    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    /// 422: well-formed but unusable (an image that does not decode).
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500: our fault. The detail goes to the log, the client gets a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the server log)",
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            r.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.insert_header(("Retry-After", "1"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: the connection cannot be reused.
            r.force_close();
        }
        r.json(Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let m = e.user_message();
        match e.kind() {
            ErrorKind::InvalidInput => Self::bad_request(m),
            ErrorKind::NotFound => Self::not_found(m),
            ErrorKind::Conflict => Self::new(StatusCode::CONFLICT, "conflict", m),
            ErrorKind::TooLarge => Self::too_large(m),
            ErrorKind::InvalidImage => Self::unprocessable("invalid_image", m),
            ErrorKind::Busy => Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", m),
            ErrorKind::TimedOut => Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", m),
            ErrorKind::Locked | ErrorKind::Unavailable => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
            ErrorKind::Internal => Self::internal(e),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        Self::internal(e)
    }
}

/// Result alias of the API handlers.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses() {
        let cases = [
            (EngineError::InvalidInput("x".into()), 400, "bad_request"),
            (EngineError::Busy("x".into()), 429, "overloaded"),
            (EngineError::TimedOut("x".into()), 503, "timeout"),
            (EngineError::NotFound("no image 3".into()), 404, "not_found"),
            (
                EngineError::Internal("secret detail".into()),
                500,
                "internal",
            ),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code));
            assert!(
                !a.message.contains("secret"),
                "internal details stay in the log"
            );
        }
    }
}
