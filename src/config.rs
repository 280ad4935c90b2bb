//! Configuration loading: built-in defaults, then a TOML file, then command-line flags.
//! `configs/default.toml` documents every key.

use std::path::{Path, PathBuf};

use pagoda_actors::config::EngineConfig;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    #[serde(flatten)]
    pub engine: EngineConfig,
}

/// The file read when `--config` is not given, if it exists (relative to the working
/// directory, so the repository root works out of the box).
pub const DEFAULT_CONFIG_PATH: &str = "configs/default.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Invalid(#[from] pagoda_actors::config::ConfigError),
}

impl Config {
    /// Loads `path`, or `configs/default.toml` when it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigLoadError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let cfg = match path {
            None => Config::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|source| ConfigLoadError::Read {
                        path: path.clone(),
                        source,
                    })?;
                Self::parse(&text).map_err(|message| ConfigLoadError::Parse { path, message })?
            }
        };
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigLoadError> {
        self.engine.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_matches_builtin_defaults() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/default.toml"))
                .expect("configs/default.toml exists");
        let cfg = Config::parse(&text).expect("default.toml parses");
        assert_eq!(cfg, Config::default());
        cfg.validate().expect("defaults are valid");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[cache]\nblok_size = 8\n").unwrap_err();
        assert!(err.contains("blok_size"), "{err}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let cfg = Config::parse("[scheduler]\nmax_num_seqs = 8\n").unwrap();
        assert_eq!(cfg.engine.scheduler.max_num_seqs, 8);
        assert_eq!(cfg.engine.cache.block_size, 16);
    }
}
