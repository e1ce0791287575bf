//! Choosing where tensors live: `auto`, `cpu` or `cuda[:N]`; and the allocator tuning every
//! binary that runs the models calls first ([`tune_malloc`]).

use candle_core::Device;

use super::error::{ModelError, Result};

/// Tensor buffers of megabytes are allocated and freed for every layer. By default glibc's malloc
/// serves each from a fresh mmap and unmaps it on free, so every layer faults its memory in again:
/// a third of the CPU time of an image embedding went to page faults. Keep freed memory in the
/// heap instead (peak memory is unchanged: the same buffers are reused).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; callers run it first in `main`, before
    // any threads start.
    unsafe {
        // No mmap-backed chunks (mallopt caps M_MMAP_THRESHOLD at 32 MB, below an attention
        // score tensor), and never give the heap's top back to the kernel.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // Two arenas, not glibc's eight per core: kept memory is per arena, and a server's
        // request threads each decode a photo of hundreds of megabytes now and then; with an
        // arena each, every one grew to the largest image it ever held (a decode budget of
        // 256 MiB, 60 s of mixed load: peak RSS 929 MiB with the default, 421 MiB with two).
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Nothing to tune outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_malloc() {}

/// Parses a device spec. `auto` takes the first GPU when the `cuda` feature is compiled in and a
/// GPU answers, else the CPU. An explicit `cuda[:N]` without GPU support falls back to the CPU with
/// a warning, so that scripts keep working on machines without a GPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda(0).unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse::<usize>().map_err(|_| {
                    ModelError::Device(format!("bad device {s:?}: expected cuda:N"))
                })?,
            };
            match cuda(ordinal) {
                Some(d) => Ok(d),
                None => {
                    tracing::warn!("device {s} is not available (built without the `cuda` feature or no GPU); using the CPU");
                    Ok(Device::Cpu)
                }
            }
        }
        other => Err(ModelError::Device(format!(
            "unknown device {other:?}: use auto, cpu or cuda:N"
        ))),
    }
}

/// A short human name of a device for status output.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Option<Device> {
    Device::new_cuda(ordinal).ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Option<Device> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert!(matches!(select_device("cpu").unwrap(), Device::Cpu));
        assert!(select_device("auto").is_ok());
        assert!(select_device("cuda:x").is_err());
        assert!(select_device("tpu").is_err());
    }
}
