//! Prometheus metrics (`GET /metrics`): requests per route, their durations, the inference
//! queue (wait, forward-pass time, batch sizes, refusals) and the collection's size.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by method, route pattern and status.
    pub requests: IntCounterVec,
    /// Request durations by method and route pattern.
    pub request_seconds: HistogramVec,
    /// Time jobs waited in the inference queue, by kind.
    pub queue_seconds: HistogramVec,
    /// Forward-pass time per batch, by kind.
    pub infer_seconds: HistogramVec,
    /// Items per batch (texts, images, ITM pairs), by kind.
    pub batch_size: HistogramVec,
    /// Requests refused because the queue was full.
    pub rejected: IntCounter,
    /// Interactive requests waiting for the models.
    pub queue_depth: IntGauge,
    /// Images in the collection.
    pub images: IntGauge,
    /// Files dealt with by the running (or last) folder ingest.
    pub ingest_done: IntGauge,
    /// Files found by the running (or last) folder ingest.
    pub ingest_total: IntGauge,
}

fn metric<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Registering a fresh metric in a fresh registry fails only on a name clash: a bug.
    if let Err(e) = r.register(Box::new(m.clone())) {
        tracing::error!(%e, "metric registration failed");
    }
    m
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("blipsearch".into()), None).unwrap_or_default();
        let secs = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ];
        let hist = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid histogram")
        };
        Self {
            requests: metric(
                &r,
                IntCounterVec::new(
                    Opts::new("http_requests_total", "HTTP requests"),
                    &["method", "route", "status"],
                )
                .expect("valid counter"),
            ),
            request_seconds: metric(
                &r,
                hist(
                    "http_request_duration_seconds",
                    "HTTP request durations",
                    &["method", "route"],
                    secs.clone(),
                ),
            ),
            queue_seconds: metric(
                &r,
                hist(
                    "inference_queue_seconds",
                    "Time waited in the inference queue",
                    &["kind"],
                    secs.clone(),
                ),
            ),
            infer_seconds: metric(
                &r,
                hist(
                    "inference_seconds",
                    "Forward-pass time per batch",
                    &["kind"],
                    secs,
                ),
            ),
            batch_size: metric(
                &r,
                hist(
                    "inference_batch_size",
                    "Items per inference batch",
                    &["kind"],
                    vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                ),
            ),
            rejected: metric(
                &r,
                IntCounter::new(
                    "inference_rejected_total",
                    "Requests refused with 429 (queue full)",
                )
                .expect("valid counter"),
            ),
            queue_depth: metric(
                &r,
                IntGauge::new("inference_queue_depth", "Requests waiting for the models")
                    .expect("valid gauge"),
            ),
            images: metric(
                &r,
                IntGauge::new("index_images", "Images in the collection").expect("valid gauge"),
            ),
            ingest_done: metric(
                &r,
                IntGauge::new("ingest_files_done", "Files dealt with by the folder ingest")
                    .expect("valid gauge"),
            ),
            ingest_total: metric(
                &r,
                IntGauge::new("ingest_files_total", "Files found by the folder ingest")
                    .expect("valid gauge"),
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%e, "encoding metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware: counts and times every request by its route pattern (not its path, so that ids
/// do not explode the label set).
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    // Only methods the API knows become labels: any other word a client sends is "other".
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m.to_string(),
        _ => "other".to_string(),
    };
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let status = res.status().as_u16().to_string();
        m.requests
            .with_label_values(&[method.as_str(), route.as_str(), status.as_str()])
            .inc();
        m.request_seconds
            .with_label_values(&[method.as_str(), route.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}
