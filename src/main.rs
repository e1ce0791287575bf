use clap::Parser;

/// Tensor buffers of megabytes are allocated and freed for every layer. By default glibc's malloc
/// serves each from a fresh mmap and unmaps it on free, so every layer faults its memory in again:
/// a third of the CPU time of an image embedding went to page faults. Keep freed memory in the
/// heap instead (peak memory is unchanged: the same buffers are reused).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        // No mmap-backed chunks (mallopt caps M_MMAP_THRESHOLD at 32 MB, below an attention
        // score tensor), and never give the heap's top back to the kernel.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> std::process::ExitCode {
    tune_malloc();
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
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
