//! Where a checkpoint comes from: a local HF snapshot directory, or a model id fetched with `hf-hub`
//! into the usual Hugging Face cache (`HF_HOME`, default `~/.cache/huggingface`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::{BlipArchitecture, BlipConfig};
use super::error::{ModelError, Result};
use super::tokenizer::BlipTokenizer;

/// Default checkpoint for retrieval (ITC + ITM).
pub const DEFAULT_RETRIEVAL_MODEL: &str = "Salesforce/blip-itm-base-coco";
/// Default checkpoint for captions.
pub const DEFAULT_CAPTION_MODEL: &str = "Salesforce/blip-image-captioning-base";

/// A checkpoint: a local directory or a Hub model id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory holding `config.json`, weights and tokenizer files.
    Dir(PathBuf),
    /// A Hugging Face Hub model id such as `Salesforce/blip-itm-base-coco`.
    Hub(String),
}

impl ModelSource {
    /// A short name for logs and index metadata.
    pub fn name(&self) -> String {
        match self {
            // Canonical, so that `./m` and `/home/me/m` name the same checkpoint.
            Self::Dir(p) => std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            Self::Hub(id) => id.clone(),
        }
    }

    /// Finds (downloading if needed) the files of the checkpoint.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            Self::Dir(dir) => ModelFiles::from_dir(dir),
            Self::Hub(id) => ModelFiles::from_hub(id),
        }
    }
}

/// The weights file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFile {
    /// `model.safetensors` (memory-mapped).
    Safetensors(PathBuf),
    /// `pytorch_model.bin` (a torch pickle).
    PyTorch(PathBuf),
}

impl WeightsFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(p) | Self::PyTorch(p) => p,
        }
    }
}

/// The files blipsearch reads from a checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The weights.
    pub weights: WeightsFile,
    /// `tokenizer.json` if present.
    pub tokenizer_json: Option<PathBuf>,
    /// `vocab.txt` if present (used when there is no `tokenizer.json`).
    pub vocab_txt: Option<PathBuf>,
}

const NO_HUB_HINT: &str =
    "Download the checkpoint elsewhere (e.g. `huggingface-cli download <id>`) and pass its \
directory with --model-dir (or --caption-model-dir), or set HF_HOME to a cache that holds it";

impl ModelFiles {
    /// The checkpoint's identity by content: SHA-256 of `config.json` and of the weights file,
    /// as `sha256:<hex>`. The same weights anywhere (another folder, the hub cache) give the
    /// same fingerprint; other weights under the same name do not.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let mut hasher = Sha256::new();
        for path in [self.config.as_path(), self.weights.path()] {
            let io = |source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(io)?;
            let mut part = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                part.update(&buf[..n]);
            }
            hasher.update(part.finalize());
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("sha256:{hex}"))
    }

    /// Reads a local snapshot directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFiles {
                model: dir.display().to_string(),
                missing: "the directory itself".into(),
                hint: "--model-dir must name a directory with config.json, model.safetensors (or \
                       pytorch_model.bin) and tokenizer.json (or vocab.txt)"
                    .into(),
            });
        }
        let have = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let weights = have("model.safetensors")
            .map(WeightsFile::Safetensors)
            .or_else(|| have("pytorch_model.bin").map(WeightsFile::PyTorch));
        Self::assemble(
            &dir.display().to_string(),
            have("config.json"),
            weights,
            have("tokenizer.json"),
            have("vocab.txt"),
            "--model-dir must name a directory with config.json, model.safetensors (or pytorch_model.bin) \
             and tokenizer.json (or vocab.txt)",
        )
    }

    /// Fetches the checkpoint's files from the Hub, or takes them from the local cache.
    /// With `HF_HUB_OFFLINE=1` only the cache is consulted.
    pub fn from_hub(id: &str) -> Result<Self> {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        let api = (!offline).then(hf_hub::api::sync::ApiBuilder::from_env);
        Self::from_hub_cache(id, &hf_hub::Cache::from_env(), api)
    }

    /// As [`Self::from_hub`], with the cache and the download client (`None`: offline) given
    /// rather than read from the environment.
    fn from_hub_cache(
        id: &str,
        cache: &hf_hub::Cache,
        api: Option<hf_hub::api::sync::ApiBuilder>,
    ) -> Result<Self> {
        let cached = cache.model(id.to_string());
        let api = api.and_then(|api| {
            api.with_progress(true)
                .build()
                .ok()
                .map(|api| api.model(id.to_string()))
        });
        let mut errors = Vec::new();
        let mut fetch = |name: &str| -> Option<PathBuf> {
            if let Some(p) = cached.get(name) {
                return Some(p);
            }
            let api = api.as_ref()?;
            match api.get(name) {
                Ok(p) => Some(p),
                Err(e) => {
                    errors.push(format!("{name}: {e}"));
                    None
                }
            }
        };
        let config = fetch("config.json");
        let weights = if config.is_some() {
            fetch("model.safetensors")
                .map(WeightsFile::Safetensors)
                .or_else(|| fetch("pytorch_model.bin").map(WeightsFile::PyTorch))
        } else {
            None
        };
        let tokenizer_json = config.as_ref().and_then(|_| fetch("tokenizer.json"));
        let vocab_txt = if tokenizer_json.is_none() && config.is_some() {
            fetch("vocab.txt")
        } else {
            None
        };
        let hint = if errors.is_empty() {
            NO_HUB_HINT.to_string()
        } else {
            format!("download failed ({}). {NO_HUB_HINT}", errors.join("; "))
        };
        Self::assemble(id, config, weights, tokenizer_json, vocab_txt, &hint)
    }

    fn assemble(
        model: &str,
        config: Option<PathBuf>,
        weights: Option<WeightsFile>,
        tokenizer_json: Option<PathBuf>,
        vocab_txt: Option<PathBuf>,
        hint: &str,
    ) -> Result<Self> {
        let mut missing = Vec::new();
        if config.is_none() {
            missing.push("config.json");
        }
        if weights.is_none() {
            missing.push("model.safetensors (or pytorch_model.bin)");
        }
        if tokenizer_json.is_none() && vocab_txt.is_none() {
            missing.push("tokenizer.json (or vocab.txt)");
        }
        match (config, weights) {
            (Some(config), Some(weights)) if missing.is_empty() => Ok(Self {
                config,
                weights,
                tokenizer_json,
                vocab_txt,
            }),
            _ => Err(ModelError::MissingFiles {
                model: model.to_string(),
                missing: missing.join(", "),
                hint: hint.to_string(),
            }),
        }
    }

    /// What every BLIP model reads first: the config (checked to be `arch`), the tokenizer and the
    /// weights (f32).
    pub(crate) fn open(
        &self,
        arch: BlipArchitecture,
        device: &Device,
    ) -> Result<(BlipConfig, BlipTokenizer, VarBuilder<'static>)> {
        let config = BlipConfig::from_file(&self.config, arch)?;
        let tokenizer =
            BlipTokenizer::from_files(self.tokenizer_json.as_deref(), self.vocab_txt.as_deref())?;
        let vb = self.var_builder(DType::F32, device)?;
        Ok((config, tokenizer, vb))
    }

    /// Opens the weights for reading (safetensors are memory-mapped, not copied).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let vb = match &self.weights {
            // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
            // truncating the checkpoint while it is open.
            WeightsFile::Safetensors(p) => unsafe {
                candle_core::safetensors::MmapedSafetensors::new(p).map(|st| {
                    VarBuilder::from_backend(Box::new(ReleasingMmap(st)), dtype, device.clone())
                })
            },
            WeightsFile::PyTorch(p) => VarBuilder::from_pth(p, dtype, device),
        };
        vb.map_err(|e| ModelError::Config {
            path: self.weights.path().to_path_buf(),
            reason: format!("cannot open weights: {e}"),
        })
    }
}

/// Memory-mapped safetensors that give each tensor's pages back once it has been copied out.
///
/// candle copies every tensor out of the map into its own buffer; the mapped pages it read stay
/// in the process's resident set until the map is dropped, so loading a model used to peak at
/// twice its size (both models: 2.7 GB for 1.8 GB of weights). `MADV_DONTNEED` on a read-only file
/// mapping only unmaps the pages (they stay in the page cache, and a later read faults them in
/// again with the same bytes), so this is safe even for tensors read twice (tied embeddings).
struct ReleasingMmap(candle_core::safetensors::MmapedSafetensors);

impl ReleasingMmap {
    fn release(&self, name: &str) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if let Ok(view) = self.0.get(name) {
            let data = view.data();
            let page = 4096usize;
            let start = (data.as_ptr() as usize).div_ceil(page) * page;
            let end = (data.as_ptr() as usize + data.len()) / page * page;
            if end > start {
                // SAFETY: [start, end) lies inside the read-only file mapping that `self.0` owns
                // (whole pages of this tensor's bytes); nothing holds a reference into it now:
                // the tensor was copied out, and the view is only used for its address.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        let _ = name;
    }
}

impl candle_nn::var_builder::SimpleBackend for ReleasingMmap {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = candle_nn::var_builder::SimpleBackend::get(&self.0, s, name, h, dtype, dev);
        self.release(name);
        t
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let t = candle_nn::var_builder::SimpleBackend::get_unchecked(&self.0, name, dtype, dev);
        self.release(name);
        t
    }

    fn contains_tensor(&self, name: &str) -> bool {
        candle_nn::var_builder::SimpleBackend::contains_tensor(&self.0, name)
    }
}

/// Turns a candle error raised while building a model into a message naming the tensor.
pub(crate) fn explain_load_error(weights: &Path, err: candle_core::Error) -> ModelError {
    use candle_core::Error as E;
    match err {
        E::CannotFindTensor { path } => ModelError::MissingTensor {
            path: weights.to_path_buf(),
            tensor: path,
        },
        E::UnexpectedShape { msg, expected, got } => ModelError::TensorShape {
            path: weights.to_path_buf(),
            tensor: msg
                .strip_prefix("shape mismatch for ")
                .unwrap_or(&msg)
                .to_string(),
            found: format!("{got:?}"),
            expected: format!("{expected:?}"),
        },
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            explain_load_error(weights, *inner)
        }
        other => ModelError::Candle(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_names_files_and_hint() {
        let tmp = std::env::temp_dir().join("blipsearch-empty-model-dir-test");
        std::fs::create_dir_all(&tmp).unwrap();
        let e = ModelFiles::from_dir(&tmp).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        assert!(e.contains("model.safetensors"), "{e}");
        assert!(e.contains("tokenizer.json"), "{e}");
        assert!(e.contains("--model-dir"), "{e}");
    }

    #[test]
    fn offline_hub_miss_says_how_to_use_model_dir() {
        // A cache dir that holds nothing, and no network calls.
        let tmp = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(tmp.path().join("hub"));
        let e = ModelFiles::from_hub_cache("Salesforce/blip-itm-base-coco", &cache, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
        assert!(e.contains("--model-dir"), "{e}");
    }
}
