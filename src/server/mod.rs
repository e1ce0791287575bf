//! `blipsearch serve`: the JSON API under `/api` (described in `/api/openapi.json`), the web UI,
//! health, readiness and Prometheus metrics, over one collection.
//!
//! - [`infer`]: the models live on one worker thread behind a bounded, batching queue; handlers
//!   and the folder ingest reach them through [`infer::InferClient`], which implements the
//!   engine's `Encoders`, so search and ingestion code is the CLI's.
//! - [`folders`]: the watched folders are synced in the background (progress in
//!   `/api/status`); search works on what is committed so far.
//! - [`routes`]: one file per area; [`error`] maps every failure to a JSON error and status in
//!   one place; [`auth`] checks the API key; [`metrics`] counts and times.

pub mod auth;
pub mod error;
pub mod folders;
pub mod infer;
pub mod metrics;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Compress, Condition};
use actix_web::{web, App, HttpRequest, HttpServer};

use crate::engine::{Engine, IngestOptions, LocalModels};
use error::ApiError;
use infer::{InferenceQueue, QueueConfig};
use metrics::Metrics;
use state::{ApiSettings, AppState, IngestStatus};

/// Everything `serve` needs besides the models and the collection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Handler settings (key, limits, folders, models).
    pub api: ApiSettings,
    /// Interactive requests that may wait for the models.
    pub queue_capacity: usize,
    /// How long a request may wait for the models.
    pub request_timeout: Duration,
    /// Time between folder scans.
    pub rescan_interval: Duration,
    /// Batching of the folder ingest.
    pub ingest: IngestOptions,
    /// Allowed CORS origins (none: no CORS headers at all).
    pub cors_origins: Vec<String>,
    /// HTTP worker threads (0: actix's default, one per core).
    pub http_workers: usize,
}

/// The running parts the HTTP app uses, and those to stop at shutdown.
pub struct Running {
    /// Shared state of the handlers.
    pub state: web::Data<AppState>,
    /// The metrics (also app data, for the middleware).
    pub metrics: web::Data<Metrics>,
    folder_sync: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts the inference worker with `models` and, when folders are configured, the folder
    /// sync thread.
    pub fn start(
        config: &ServerConfig,
        models: LocalModels,
        engine: Engine,
    ) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        match engine.remove_orphan_uploads() {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "removed uploaded files that no image points to"),
            Err(e) => tracing::warn!(%e, "cannot clean the upload directory"),
        }
        let queue = InferenceQueue::start(
            models,
            QueueConfig {
                capacity: config.queue_capacity,
                timeout: config.request_timeout,
            },
            metrics.clone(),
        );
        let engine = Arc::new(engine);
        let ingest = Arc::new(IngestStatus::default());
        let folder_sync = if config.api.folders.is_empty() {
            None
        } else {
            Some(folders::spawn(
                config.api.folders.clone(),
                config.rescan_interval,
                engine.clone(),
                queue.background_client(),
                IngestOptions {
                    // The folder ingest shares the requests' decode budget, and waits for it.
                    budget: config.api.budget.clone(),
                    budget_wait: None,
                    actor: "folder-sync".into(),
                    ..config.ingest.clone()
                },
                ingest.clone(),
            )?)
        };
        let state = AppState {
            engine,
            client: queue.client(),
            queue,
            ingest,
            settings: config.api.clone(),
            metrics: metrics.clone(),
        };
        Ok(Self {
            state: web::Data::new(state),
            metrics: web::Data::from(metrics),
            folder_sync,
        })
    }

    /// Stops the folder sync (it commits what it has) and the inference worker.
    pub fn stop(self) {
        self.state.ingest.progress.cancel();
        if let Some(t) = self.folder_sync {
            let _ = t.join();
        }
        drop(self.metrics);
        match Arc::try_unwrap(web::Data::into_inner(self.state)) {
            Ok(state) => {
                let AppState { queue, client, .. } = state;
                drop(client);
                queue.shutdown();
            }
            // A handler still holds it: the worker stops when the last client goes.
            Err(_) => tracing::debug!("state still shared at shutdown"),
        }
    }
}

fn json_error(e: impl std::fmt::Display, _: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(e.to_string()).into()
}

async fn not_found(req: HttpRequest) -> error::ApiResult<actix_web::HttpResponse> {
    Err(ApiError::not_found(format!(
        "no route {} {}",
        req.method(),
        req.path()
    )))
}

/// The app: routes, JSON errors for malformed requests, API key, metrics, optional CORS.
pub fn app(
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
    cors_origins: &[String],
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(["GET", "POST", "DELETE"])
        .allowed_headers(["authorization", "x-api-key", "content-type"])
        .max_age(600);
    for o in cors_origins {
        cors = cors.allowed_origin(o);
    }
    App::new()
        .app_data(state)
        .app_data(metrics)
        .app_data(web::QueryConfig::default().error_handler(json_error))
        .app_data(web::PathConfig::default().error_handler(json_error))
        .app_data(web::JsonConfig::default().error_handler(json_error))
        .configure(routes::search::configure)
        .configure(routes::images::configure)
        .configure(routes::products::configure)
        .configure(routes::moderation::configure)
        .configure(routes::system::configure)
        .configure(routes::ui::configure)
        .default_service(web::to(not_found))
        .wrap(Condition::new(!cors_origins.is_empty(), cors))
        .wrap(Compress::default())
        .wrap(from_fn(metrics::track))
}

/// Runs the server until Ctrl-C (or SIGTERM), then stops cleanly: in-flight requests finish,
/// the folder ingest commits what it has, the worker stops.
pub fn serve(config: ServerConfig, models: LocalModels, engine: Engine) -> std::io::Result<()> {
    let running = Running::start(&config, models, engine)?;
    let cors = config.cors_origins.clone();
    let state = running.state.clone();
    let engine = running.state.engine.clone();
    let metrics = running.metrics.clone();
    let result = actix_web::rt::System::new().block_on(async move {
        let mut server = HttpServer::new(move || app(state.clone(), metrics.clone(), &cors))
            .shutdown_timeout(10)
            // Headers must arrive within this (bodies have their own limit, BODY_TIMEOUT).
            .client_request_timeout(Duration::from_secs(10))
            .keep_alive(Duration::from_secs(30));
        if config.http_workers > 0 {
            server = server.workers(config.http_workers);
        }
        let server = server.bind(config.bind)?;
        for a in server.addrs() {
            eprintln!("blipsearch is serving on http://{a}/ (Ctrl-C to stop)");
        }
        // So that a command refused by the collection's lock can say where to go (a shared
        // store takes no lock).
        let locked = !engine.shared().unwrap_or(true);
        if let Some(a) = server.addrs().first().filter(|_| locked) {
            if let Err(e) = engine.announce_serving(&format!("http://{a}")) {
                tracing::warn!(%e, "cannot record the serving address");
            }
        }
        let result = server.run().await;
        engine.withdraw_serving();
        result
    });
    eprintln!("stopping: committing the folder ingest and stopping the models...");
    running.stop();
    result
}
