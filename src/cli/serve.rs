//! `blipsearch serve`: the web API and UI over a collection, keeping folders in sync.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::collection::{ingest_options, open_with_models, IngestCommon, Instead};
use crate::engine::Encoders;
use crate::server::state::ApiSettings;
use crate::server::{serve as run_server, ServerConfig};

/// How long a request waits for room in the decode budget before it is refused with 429.
const DECODE_WAIT: Duration = Duration::from_secs(5);

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folders to index and keep in sync in the background (repeat for several).
    #[arg(long = "images", value_name = "DIR")]
    images: Vec<PathBuf>,
    /// Address to listen on. Loopback by default: pass 0.0.0.0:8080 to serve the network
    /// (and set --api-key).
    #[arg(long, env = "BLIPSEARCH_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    #[command(flatten)]
    common: IngestCommon,
    /// Key required for every write (upload, delete, caption), sent as
    /// `Authorization: Bearer KEY` or `X-Api-Key`.
    #[arg(long, env = "BLIPSEARCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Require the key for reads (search, images, status, metrics) too.
    #[arg(long, requires = "api_key")]
    protect_reads: bool,
    /// Largest upload, in megabytes.
    #[arg(long, default_value_t = 20.0)]
    max_upload_mb: f64,
    /// Requests that may wait for the models; more get 429.
    #[arg(long, default_value_t = 64)]
    queue_capacity: usize,
    /// Seconds a request may wait for the models (queueing included).
    #[arg(long, default_value_t = 120)]
    request_timeout: u64,
    /// Seconds a request body may take to arrive, whole (then 408 and the connection closes).
    #[arg(long, default_value_t = 60)]
    body_timeout: u64,
    /// Seconds between scans of the --images folders.
    #[arg(long, default_value_t = 60)]
    rescan_interval: u64,
    /// Allow this browser origin to call the API (repeat for several); no CORS otherwise.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// HTTP worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    http_workers: usize,
}

/// Runs `serve`.
pub fn serve(a: ServeArgs) -> Result<()> {
    let c = &a.common;
    if !(a.max_upload_mb > 0.0 && a.max_upload_mb.is_finite()) {
        bail!("--max-upload-mb must be positive");
    }
    if a.queue_capacity == 0
        || a.request_timeout == 0
        || a.rescan_interval == 0
        || a.body_timeout == 0
    {
        bail!(
            "--queue-capacity, --request-timeout, --body-timeout and --rescan-interval must be at \
             least 1"
        );
    }
    if a.api_key.as_deref().is_some_and(|k| k.trim().len() < 8) {
        bail!("--api-key must be at least 8 characters");
    }
    let mut folders = Vec::new();
    for f in &a.images {
        let canon = std::fs::canonicalize(f)
            .with_context(|| format!("--images {}: cannot open the folder", f.display()))?;
        if !canon.is_dir() {
            bail!("--images {}: not a folder", f.display());
        }
        folders.push(canon);
    }
    if !a.bind.ip().is_loopback() && a.api_key.is_none() {
        eprintln!(
            "warning: serving on {} without --api-key: anyone who can reach it can upload and \
             delete images",
            a.bind
        );
    }
    eprintln!("loading models...");
    let (engine, models) = open_with_models(c, Instead::StopFirst)
        .with_context(|| format!("opening the collection in {}", c.index.describe()))?;
    let limits = c.model.limits()?;
    let options = ingest_options(c)?;
    // One forward pass before serving, so that the first user does not pay for warm-up.
    models
        .encode_texts(vec!["warm up".into()])
        .context("warming up the retrieval model")?;
    let device = models.device_name();
    let config = ServerConfig {
        bind: a.bind,
        api: ApiSettings {
            api_key: a.api_key.clone(),
            protect_reads: a.protect_reads,
            max_upload_bytes: (a.max_upload_mb * 1024.0 * 1024.0) as usize,
            body_timeout: Duration::from_secs(a.body_timeout),
            limits,
            budget: options.budget.clone(),
            decode_wait: DECODE_WAIT,
            capfilt: options.capfilt.clone(),
            folders,
            retrieval_model: models.retriever.name().to_string(),
            caption_model: models.captioner.as_ref().map(|m| m.name().to_string()),
            device,
        },
        queue_capacity: a.queue_capacity,
        request_timeout: Duration::from_secs(a.request_timeout),
        rescan_interval: Duration::from_secs(a.rescan_interval),
        ingest: options,
        cors_origins: a.cors_origins.clone(),
        http_workers: a.http_workers,
    };
    run_server(config, models, engine).context("running the server")?;
    eprintln!("stopped");
    Ok(())
}
