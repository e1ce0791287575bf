//! The trainable parameters: a candle `VarMap` keyed by HF tensor names, so that a checkpoint
//! loads into it and it saves back as one that both blipsearch and `transformers` read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::nets;
use super::{Result, TrainError};
use crate::model::config::{BlipArchitecture, BlipConfig};
use crate::model::weights::{ModelFiles, WeightsFile};

/// Name of ITC's learnable temperature in the store. It is not part of HF checkpoints, so it is
/// kept with the training state.
pub const TEMP: &str = "temp";

/// BLIP's initial ITC temperature.
pub const TEMP_INIT: f32 = 0.07;

/// Tokenizer and preprocessing side files copied next to every saved checkpoint.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
];

/// Trainable parameters of one BLIP model.
pub struct ParamStore {
    /// The variables, by HF tensor name (plus [`TEMP`] for the retrieval model).
    pub varmap: VarMap,
    /// The parsed config.
    pub config: BlipConfig,
    /// `config.json` as read, written back unchanged with saved checkpoints.
    pub config_json: serde_json::Value,
    /// Where tokenizer files are copied from when saving.
    pub side_files_dir: PathBuf,
    /// The device the variables live on.
    pub device: Device,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_config_json(path: &Path) -> Result<serde_json::Value> {
    let text = fs_err::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })
}

impl ParamStore {
    /// Loads a checkpoint directory (fine-tuning). Every tensor of the file becomes a variable;
    /// the retrieval model also gets the temperature at 0.07.
    pub fn from_checkpoint(dir: &Path, arch: BlipArchitecture, device: &Device) -> Result<Self> {
        let files = ModelFiles::from_dir(dir)?;
        let config = BlipConfig::from_file(&files.config, arch)?;
        let config_json = read_config_json(&files.config)?;
        let tensors = load_tensors(&files.weights, device)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().map_err(|_| poisoned())?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
            }
        }
        let store = Self {
            varmap,
            config,
            config_json,
            side_files_dir: dir.to_path_buf(),
            device: device.clone(),
        };
        // Check that every tensor the architecture needs is there, with the right shape.
        store
            .check_builds(arch)
            .map_err(|e| TrainError::Checkpoint {
                path: files.weights.path().to_path_buf(),
                reason: e.to_string(),
            })?;
        store.add_temp(arch)?;
        Ok(store)
    }

    /// A fresh model from `config.json` (training from scratch), initialised as BLIP/HF do:
    /// linear, convolution and embedding weights (ViT class and position embeddings included)
    /// `N(0, 0.02²)`, biases 0, LayerNorm weight 1 and bias 0. `side_files_dir` supplies the
    /// tokenizer files of saved checkpoints.
    pub fn from_config(
        config_path: &Path,
        side_files_dir: &Path,
        arch: BlipArchitecture,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let config = BlipConfig::from_file(config_path, arch)?;
        let config_json = read_config_json(config_path)?;
        let store = Self {
            varmap: VarMap::new(),
            config,
            config_json,
            side_files_dir: side_files_dir.to_path_buf(),
            device: device.clone(),
        };
        // Building the network through a VarMap-backed builder creates every variable it uses.
        store.check_builds(arch)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut names: Vec<String> = store.names()?;
        names.sort();
        let data = store.varmap.data().lock().map_err(|_| poisoned())?;
        for name in &names {
            let var = &data[name];
            let shape = var.shape().clone();
            let n = shape.elem_count();
            let values: Vec<f32> = match init_rule(name) {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => (0..n).map(|_| normal(&mut rng) * std).collect(),
            };
            var.set(&Tensor::from_vec(values, shape, device)?)?;
        }
        drop(data);
        store.add_temp(arch)?;
        Ok(store)
    }

    fn add_temp(&self, arch: BlipArchitecture) -> Result<()> {
        if arch == BlipArchitecture::Retrieval {
            let t = Tensor::new(TEMP_INIT, &self.device)?;
            self.varmap
                .data()
                .lock()
                .map_err(|_| poisoned())?
                .insert(TEMP.to_string(), Var::from_tensor(&t)?);
        }
        Ok(())
    }

    fn check_builds(&self, arch: BlipArchitecture) -> Result<()> {
        Ok(nets::declare(arch, &self.config, self.var_builder())?)
    }

    /// A builder over the variables (for building the networks each step: they then see the
    /// values the optimiser wrote).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device)
    }

    /// Variable names.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .varmap
            .data()
            .lock()
            .map_err(|_| poisoned())?
            .keys()
            .cloned()
            .collect())
    }

    /// The variable `name`.
    pub fn var(&self, name: &str) -> Result<Var> {
        self.varmap
            .data()
            .lock()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned()
            .ok_or_else(|| TrainError::InvalidInput(format!("no parameter {name}")))
    }

    /// Current values of every variable (detached copies of the handles).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .varmap
            .data()
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect())
    }

    /// Overwrites variables with the values in `tensors` (same names and shapes; used to resume).
    pub fn set_from(&self, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let data = self.varmap.data().lock().map_err(|_| poisoned())?;
        for (name, var) in data.iter() {
            let t = tensors.get(name).ok_or_else(|| TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor {name} is missing"),
            })?;
            if t.shape() != var.shape() {
                return Err(TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor {name} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_device(&self.device)?.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Writes an HF checkpoint into `dir`: `config.json`, `model.safetensors` (every parameter
    /// under its HF name; the temperature stays out) and the tokenizer side files.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        fs_err::create_dir_all(dir).map_err(io_err(dir))?;
        let mut tensors = self.tensors()?;
        tensors.remove(TEMP);
        let weights = dir.join("model.safetensors");
        let tmp = dir.join("model.safetensors.tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        fs_err::rename(&tmp, &weights).map_err(io_err(&weights))?;
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config_json)
            .map_err(|e| TrainError::InvalidInput(e.to_string()))?;
        fs_err::write(&config, text + "\n").map_err(io_err(&config))?;
        for name in SIDE_FILES {
            let src = self.side_files_dir.join(name);
            let dst = dir.join(name);
            if src.is_file() && src != dst {
                // Through a temporary file: a `dst` that is a link (to `src` itself, say) is
                // replaced, never written through.
                let tmp = dir.join(format!("{name}.tmp"));
                fs_err::copy(&src, &tmp).map_err(io_err(&src))?;
                fs_err::rename(&tmp, &dst).map_err(io_err(&dst))?;
            }
        }
        Ok(())
    }
}

fn poisoned() -> TrainError {
    TrainError::InvalidInput("parameter store lock poisoned by an earlier panic".into())
}

/// Reads every tensor of a weights file.
pub fn load_tensors(weights: &WeightsFile, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = weights.path();
    let err = |e: candle_core::Error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot read weights: {e}"),
    };
    match weights {
        WeightsFile::Safetensors(p) => candle_core::safetensors::load(p, device).map_err(err),
        WeightsFile::PyTorch(p) => {
            let all = candle_core::pickle::read_all(p).map_err(err)?;
            all.into_iter()
                .map(|(k, t)| Ok((k, t.to_device(device)?)))
                .collect()
        }
    }
}

enum Init {
    Zeros,
    Ones,
    Normal(f32),
}

/// BLIP/HF initialisation by tensor name.
fn init_rule(name: &str) -> Init {
    let is_norm =
        name.contains("LayerNorm") || name.contains("layer_norm") || name.contains("layernorm");
    if name.ends_with("bias") {
        Init::Zeros
    } else if is_norm {
        Init::Ones
    } else {
        Init::Normal(0.02)
    }
}

/// One standard normal draw (Box-Muller), so that initialisation depends only on the seed.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_rules() {
        assert!(matches!(
            init_rule("text_encoder.embeddings.LayerNorm.weight"),
            Init::Ones
        ));
        assert!(matches!(
            init_rule("vision_model.post_layernorm.bias"),
            Init::Zeros
        ));
        assert!(matches!(
            init_rule("vision_model.encoder.layers.0.layer_norm1.weight"),
            Init::Ones
        ));
        assert!(matches!(
            init_rule("text_decoder.cls.predictions.bias"),
            Init::Zeros
        ));
        assert!(matches!(init_rule("itm_head.weight"), Init::Normal(_)));
        assert!(matches!(
            init_rule("vision_model.embeddings.class_embedding"),
            Init::Normal(_)
        ));
    }

    /// Saving into a folder whose tokenizer files link to the checkpoint's own (as the test
    /// fixtures' do) replaces the links and leaves the linked files whole.
    #[cfg(unix)]
    #[test]
    fn saving_over_linked_side_files_keeps_their_targets() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a/caption");
        let tmp = tempfile::tempdir().unwrap();
        let (from, out) = (tmp.path().join("from"), tmp.path().join("out"));
        fs_err::create_dir_all(&from).unwrap();
        fs_err::create_dir_all(&out).unwrap();
        for entry in fs_err::read_dir(&fixture).unwrap() {
            let path = entry.unwrap().path();
            fs_err::copy(&path, from.join(path.file_name().unwrap())).unwrap();
        }
        let vocab = fs_err::read(from.join("vocab.txt")).unwrap();
        for name in SIDE_FILES {
            if from.join(name).is_file() {
                std::os::unix::fs::symlink(from.join(name), out.join(name)).unwrap();
            }
        }
        let store =
            ParamStore::from_checkpoint(&from, BlipArchitecture::Captioning, &Device::Cpu).unwrap();
        store.save_hf(&out).unwrap();
        assert_eq!(fs_err::read(from.join("vocab.txt")).unwrap(), vocab);
        assert_eq!(fs_err::read(out.join("vocab.txt")).unwrap(), vocab);
        assert!(!out.join("vocab.txt").is_symlink());
    }
}
