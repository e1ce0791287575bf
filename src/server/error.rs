//! API errors: every failure becomes `{"error":{"code":..,"message":..}}` with its status, in
//! this one place.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::EngineError;
use crate::index::IndexError;
use crate::model::ModelError;

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
        match e {
            EngineError::InvalidInput(m) => Self::bad_request(m),
            EngineError::Busy(m) => Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", m),
            EngineError::TimedOut(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", m),
            EngineError::Model(ModelError::InvalidInput(m)) => Self::bad_request(m),
            EngineError::Model(ModelError::Image { reason, .. }) => {
                Self::unprocessable("invalid_image", reason)
            }
            EngineError::Model(ModelError::TooManyPixels {
                width,
                height,
                max_pixels,
                ..
            }) => Self::too_large(format!(
                "{width}x{height} is {:.1} megapixels, over the limit of {:.1}",
                f64::from(width) * f64::from(height) / 1e6,
                max_pixels as f64 / 1e6
            )),
            EngineError::Model(ModelError::OverBudget {
                needed_mib,
                capacity_mib,
                ..
            }) => Self::too_large(format!(
                "decoding this image needs {needed_mib} MiB, over the server's decode memory \
                 budget of {capacity_mib} MiB"
            )),
            EngineError::Model(ModelError::Busy(m)) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", m)
            }
            EngineError::Index(IndexError::InvalidQuery(m)) => Self::bad_request(m),
            EngineError::Index(IndexError::NotFound(id)) => {
                Self::not_found(format!("no image with id {id}"))
            }
            other => Self::internal(other),
        }
    }
}

impl From<IndexError> for ApiError {
    fn from(e: IndexError) -> Self {
        EngineError::from(e).into()
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
            (
                EngineError::Index(IndexError::NotFound(crate::index::ImageId(3))),
                404,
                "not_found",
            ),
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
