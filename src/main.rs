use clap::Parser;

fn main() -> std::process::ExitCode {
    blipsearch::model::device::tune_malloc();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,hnsw_rs=warn,tantivy=warn")
            }),
        )
        .init();
    match blipsearch::cli::run(blipsearch::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", blipsearch::cli::error_message(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
