//! Choosing where tensors live: `auto`, `cpu` or `cuda[:N]`.

use candle_core::Device;

use super::error::{ModelError, Result};

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
