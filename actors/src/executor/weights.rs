//! Reading weights from disk: a GGUF file (weights stay quantized) or a Hugging Face
//! directory of safetensors (f32 / f16 / bf16, computed in f32). The model code asks for
//! tensors by their GGUF names (`blk.3.attn_q.weight`); a safetensors source translates
//! them to the Hugging Face names (`model.layers.3.self_attn.q_proj.weight`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use pagoda_kernels::quant::{QMatrix, QuantFormat};

use super::linear::Linear;

/// Why a model could not be loaded. Every variant names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path} is not a valid GGUF file (corrupt or truncated?): {message}")]
    BadGguf { path: PathBuf, message: String },
    #[error("{path}: bad safetensors data: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error("{path}: bad config.json: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error(
        "unsupported model architecture '{0}' (supported: {supported})",
        supported = crate::executor::models::supported_names()
    )]
    UnsupportedArchitecture(String),
    #[error("model metadata key '{0}' is missing or has the wrong type")]
    MissingMetadata(String),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}': {message}")]
    BadTensor { name: String, message: String },
    #[error("{0}")]
    Shape(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("compute backend: {0}")]
    Backend(String),
}

/// Where the weights come from.
pub enum WeightSource {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        reader: BufReader<File>,
    },
    Safetensors {
        dir: PathBuf,
        tensors: HashMap<String, Tensor>,
        /// The directory's `config.json`.
        config: serde_json::Value,
    },
}

impl WeightSource {
    /// Whether the weights are stored in f32 (a safetensors model with f32 tensors), for
    /// `cache.kv_cache_dtype = "auto"`: such models keep an f32 KV cache.
    pub fn stores_f32(&self) -> bool {
        match self {
            WeightSource::Gguf { .. } => false,
            WeightSource::Safetensors { tensors, .. } => {
                tensors.values().any(|t| t.dtype() == DType::F32)
            }
        }
    }

    /// Opens a GGUF file and reads its header, metadata and tensor directory.
    pub fn open_gguf(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|e| LoadError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| LoadError::BadGguf {
            path: path.to_path_buf(),
            message: candle_message(&e),
        })?;
        // A truncated file is caught here, before minutes of loading: every tensor must lie
        // inside the file.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(LoadError::BadGguf {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor '{name}' ends at byte {end} but the file has {file_len} bytes (truncated)"
                    ),
                });
            }
        }
        Ok(Self::Gguf {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// Loads every safetensors file of a Hugging Face model directory (single file or
    /// sharded with `model.safetensors.index.json`).
    pub fn open_safetensors(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = read_text(&index)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::BadSafetensors {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::BadSafetensors {
                    path: index.clone(),
                    message: "no weight_map object".into(),
                })?;
            let mut shards: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            return Err(LoadError::NotFound(single));
        };
        let config_path = dir.join("config.json");
        let config: serde_json::Value =
            serde_json::from_str(&read_text(&config_path)?).map_err(|e| LoadError::BadConfig {
                path: config_path.clone(),
                message: e.to_string(),
            })?;
        let mut tensors = HashMap::new();
        for f in files {
            let part = candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| {
                LoadError::BadSafetensors {
                    path: f.clone(),
                    message: e.to_string(),
                }
            })?;
            tensors.extend(part);
        }
        Ok(Self::Safetensors {
            dir: dir.to_path_buf(),
            tensors,
            config,
        })
    }

    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match self {
            Self::Gguf { content, .. } => Some(&content.metadata),
            Self::Safetensors { .. } => None,
        }
    }

    /// The `config.json` of a Hugging Face directory.
    pub fn hf_config(&self) -> Option<&serde_json::Value> {
        match self {
            Self::Gguf { .. } => None,
            Self::Safetensors { config, .. } => Some(config),
        }
    }

    /// The `config.json` path of a Hugging Face directory (for error messages).
    pub fn hf_config_path(&self) -> Option<PathBuf> {
        match self {
            Self::Gguf { .. } => None,
            Self::Safetensors { dir, .. } => Some(dir.join("config.json")),
        }
    }

    /// Expert `expert` of a mixture-of-experts weight: from GGUF, a slice of the stacked
    /// tensor `stacked` (`[experts, rows, cols]`, as llama.cpp stores them; quantized
    /// experts stay quantized); from safetensors, the tensor `hf` (Hugging Face keeps
    /// one tensor per expert).
    pub fn expert_linear(
        &mut self,
        stacked: &str,
        expert: usize,
        hf: &str,
    ) -> Result<Linear, LoadError> {
        match self {
            Self::Safetensors { tensors, .. } => {
                let t = tensors
                    .get(hf)
                    .ok_or_else(|| LoadError::MissingTensor(hf.to_owned()))?;
                let (rows, cols) = t.dims2().map_err(|e| bad(hf, e))?;
                let w = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| bad(hf, e))?;
                Linear::dense(w, rows, cols)
            }
            Self::Gguf { .. } => {
                let qt = self.gguf_tensor(stacked)?;
                let dims = qt.shape().dims().to_vec();
                let (experts, rows, cols) = match dims.as_slice() {
                    [e, r, c] => (*e, *r, *c),
                    _ => {
                        return Err(bad(
                            stacked,
                            format!("expected [experts, rows, cols], got {dims:?}"),
                        ))
                    }
                };
                if expert >= experts {
                    return Err(bad(stacked, format!("no expert {expert} of {experts}")));
                }
                let format = match qt.dtype() {
                    GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
                    GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
                    GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
                    _ => None,
                };
                match format {
                    Some(format) => {
                        let data = qt.data().map_err(|e| bad(stacked, e))?;
                        let per = data.len() / experts;
                        let part = data[expert * per..(expert + 1) * per].to_vec();
                        let m =
                            QMatrix::new(format, rows, cols, part).map_err(|e| bad(stacked, e))?;
                        Ok(Linear::quant(m))
                    }
                    None => {
                        let all = qt
                            .dequantize(&Device::Cpu)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(|e| bad(stacked, e))?;
                        let per = rows * cols;
                        Linear::dense(all[expert * per..(expert + 1) * per].to_vec(), rows, cols)
                    }
                }
            }
        }
    }

    /// Does the model have this tensor (GGUF name)?
    pub fn has(&self, name: &str) -> bool {
        self.has_as(name, &hf_name(name))
    }

    /// [`Self::has`] naming the tensor in each format (see [`Self::linear_as`]).
    pub fn has_as(&self, name: &str, hf: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Self::Safetensors { tensors, .. } => tensors.contains_key(hf),
        }
    }

    /// A 1-D tensor (norm weights, biases) as f32.
    pub fn vector(&mut self, name: &str) -> Result<Vec<f32>, LoadError> {
        self.vector_as(name, &hf_name(name))
    }

    /// [`Self::vector`] naming the tensor in each format (see [`Self::linear_as`]).
    pub fn vector_as(&mut self, name: &str, hf: &str) -> Result<Vec<f32>, LoadError> {
        let t = match self {
            Self::Gguf { .. } => self
                .gguf_tensor(name)?
                .dequantize(&Device::Cpu)
                .map_err(|e| bad(name, e))?,
            Self::Safetensors { tensors, .. } => tensors
                .get(hf)
                .cloned()
                .ok_or_else(|| LoadError::MissingTensor(hf.to_owned()))?,
        };
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| bad(name, e))
    }

    /// A 2-D weight [rows = out features, cols = in features] as a linear layer. With
    /// `row_access`, the layer must support row lookups (embeddings), so formats without a
    /// pagoda kernel are dequantized.
    pub fn linear(&mut self, name: &str, row_access: bool) -> Result<Linear, LoadError> {
        self.linear_as(name, &hf_name(name), row_access)
    }

    /// [`Self::linear`] naming the tensor in each format: `gguf` in a GGUF file, `hf` in a
    /// Hugging Face directory (for families whose names the generic mapping does not know).
    pub fn linear_as(
        &mut self,
        name: &str,
        hf: &str,
        row_access: bool,
    ) -> Result<Linear, LoadError> {
        match self {
            Self::Gguf { .. } => {
                let qt = self.gguf_tensor(name)?;
                let dims = qt.shape().dims().to_vec();
                let (rows, cols) = match dims.as_slice() {
                    [r, c] => (*r, *c),
                    _ => return Err(bad(name, format!("expected 2 dimensions, got {dims:?}"))),
                };
                let format = match qt.dtype() {
                    GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
                    GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
                    GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
                    _ => None,
                };
                match format {
                    Some(format) => {
                        let data = qt.data().map_err(|e| bad(name, e))?.into_owned();
                        let m = QMatrix::new(format, rows, cols, data).map_err(|e| bad(name, e))?;
                        Ok(Linear::quant(m))
                    }
                    None if matches!(
                        qt.dtype(),
                        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                    ) || row_access =>
                    {
                        let w = qt
                            .dequantize(&Device::Cpu)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .map_err(|e| bad(name, e))?;
                        Linear::dense(w, rows, cols)
                    }
                    None => {
                        let m = QMatMul::from_qtensor(qt).map_err(|e| bad(name, e))?;
                        Ok(Linear::candle(m, rows, cols))
                    }
                }
            }
            Self::Safetensors { tensors, .. } => {
                let t = tensors
                    .get(hf)
                    .ok_or_else(|| LoadError::MissingTensor(hf.to_owned()))?;
                let (rows, cols) = t.dims2().map_err(|e| bad(hf, e))?;
                let w = t
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| bad(hf, e))?;
                Linear::dense(w, rows, cols)
            }
        }
    }

    fn gguf_tensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor, LoadError> {
        match self {
            Self::Gguf {
                content,
                reader,
                path,
            } => {
                if !content.tensor_infos.contains_key(name) {
                    return Err(LoadError::MissingTensor(name.to_string()));
                }
                content
                    .tensor(reader, name, &Device::Cpu)
                    .map_err(|e| LoadError::BadGguf {
                        path: path.clone(),
                        message: format!("tensor '{name}': {}", candle_message(&e)),
                    })
            }
            Self::Safetensors { .. } => Err(LoadError::MissingTensor(name.to_string())),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Gguf { path, .. } => path.display().to_string(),
            Self::Safetensors { dir, .. } => dir.display().to_string(),
        }
    }
}

/// A candle error's message without the backtrace candle attaches to it when
/// `RUST_BACKTRACE` is set (a user-facing load error must stay one line).
fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

fn bad(name: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::BadTensor {
        name: name.to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn read_text(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Translates a GGUF tensor name to its Hugging Face (transformers) name.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    if let Some(rest) = gguf.strip_prefix("blk.") {
        if let Some((layer, part)) = rest.split_once('.') {
            let (module, suffix) = part.split_once('.').unwrap_or((part, "weight"));
            let hf = match module {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "ffn_gate_inp" => "block_sparse_moe.gate",
                other => other,
            };
            return format!("model.layers.{layer}.{hf}.{suffix}");
        }
    }
    gguf.to_string()
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(
            hf_name("blk.12.attn_q.weight"),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight"),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }
}
