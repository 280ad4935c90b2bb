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
    pub nats: NatsConfig,
    pub intake: IntakeConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub placement: PlacementConfig,
}

/// Which actors `pagoda serve` runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// All five actors in this process (the actors talk without serialization).
    #[default]
    All,
    /// The NATS edge, tokenizer and detokenizer; sequences go to engine processes.
    Frontend,
    /// Scheduler, block manager and executor; sequences come from frontend processes.
    Engine,
}

/// The `[placement]` section: one process, or frontends and engines over NATS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    pub role: Role,
    /// Frontends and engines announce themselves this often (ms).
    pub heartbeat_interval_ms: u64,
    /// A peer silent for this long is gone: its sequences end (ms).
    pub peer_timeout_ms: u64,
    /// A frontend's call to an engine (new sequence, finish) gives up after this long (ms).
    pub call_timeout_ms: u64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            role: Role::All,
            heartbeat_interval_ms: 250,
            peer_timeout_ms: 1000,
            call_timeout_ms: 2000,
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> Result<(), pagoda_actors::config::ConfigError> {
        let err = |m: &str| Err(pagoda_actors::config::ConfigError(m.to_owned()));
        if self.heartbeat_interval_ms == 0 {
            return err("placement.heartbeat_interval_ms must be at least 1");
        }
        if self.peer_timeout_ms < 2 * self.heartbeat_interval_ms {
            return err(
                "placement.peer_timeout_ms must be at least twice placement.heartbeat_interval_ms",
            );
        }
        if self.call_timeout_ms == 0 {
            return err("placement.call_timeout_ms must be at least 1");
        }
        Ok(())
    }
}

/// The `[metrics]` section: the HTTP listener of `pagoda serve` (`/metrics`, `/health`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the listener; empty = no listener (and no metrics).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

/// Where `pagoda serve` takes its requests from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IntakeMode {
    /// Core NATS request/reply on `<prefix>.generate` (at most once, the fast path).
    #[default]
    Core,
    /// A JetStream work-queue stream on `<prefix>.jobs.>`, pulled by a durable consumer
    /// shared by all engines (at least once, redelivered when an engine dies).
    Jetstream,
}

/// Where a JetStream stream keeps its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStorage {
    #[default]
    File,
    Memory,
}

/// The `[intake]` section: core NATS or durable JetStream intake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntakeConfig {
    pub mode: IntakeMode,
    /// Durable name of the pull consumer all engines share.
    pub durable_name: String,
    /// Deliveries of one job at most (the last failing one goes to `<prefix>.dead`).
    pub max_deliver: i64,
    /// A job not acknowledged (nor marked in progress) for this long is redelivered (ms).
    pub ack_wait_ms: u64,
    /// Jobs one engine holds at once (fetched and not yet finished).
    pub max_in_flight: usize,
    /// How long one pull request waits for jobs before it is renewed (ms).
    pub fetch_expires_ms: u64,
    pub stream: StreamSettings,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            mode: IntakeMode::Core,
            durable_name: "pagoda".into(),
            max_deliver: 3,
            ack_wait_ms: 30_000,
            max_in_flight: 64,
            fetch_expires_ms: 1000,
            stream: StreamSettings::default(),
        }
    }
}

/// The `[intake.stream]` section: the work-queue stream (created when missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    pub name: String,
    /// Jobs older than this are dropped by the server (s); 0 = no limit.
    pub max_age_s: u64,
    /// Jobs kept at most; -1 = no limit.
    pub max_msgs: i64,
    /// Bytes kept at most; -1 = no limit.
    pub max_bytes: i64,
    pub replicas: usize,
    pub storage: StreamStorage,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            name: "PAGODA_JOBS".into(),
            max_age_s: 0,
            max_msgs: -1,
            max_bytes: -1,
            replicas: 1,
            storage: StreamStorage::File,
        }
    }
}

impl IntakeConfig {
    /// Jobs are published on `<prefix>.jobs.generate`.
    pub fn jobs_subject(prefix: &str) -> String {
        format!("{prefix}.jobs.generate")
    }

    /// The stream's subjects: `<prefix>.jobs.>`.
    pub fn stream_subjects(prefix: &str) -> String {
        format!("{prefix}.jobs.>")
    }

    /// Jobs that failed every attempt are copied to `<prefix>.dead`.
    pub fn dead_subject(prefix: &str) -> String {
        format!("{prefix}.dead")
    }

    pub fn validate(&self) -> Result<(), pagoda_actors::config::ConfigError> {
        let err = |m: String| Err(pagoda_actors::config::ConfigError(m));
        if self.max_deliver < 1 {
            return err("intake.max_deliver must be at least 1".into());
        }
        if self.ack_wait_ms < 100 {
            return err("intake.ack_wait_ms must be at least 100".into());
        }
        if self.max_in_flight == 0 {
            return err("intake.max_in_flight must be at least 1".into());
        }
        if self.fetch_expires_ms < 100 {
            return err("intake.fetch_expires_ms must be at least 100".into());
        }
        if self.durable_name.is_empty()
            || !self
                .durable_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return err("intake.durable_name must be a word of [A-Za-z0-9_-]".into());
        }
        let name = &self.stream.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return err("intake.stream.name must be a word of [A-Za-z0-9_-]".into());
        }
        if self.stream.replicas == 0 || self.stream.replicas > 5 {
            return err("intake.stream.replicas must be 1 to 5".into());
        }
        Ok(())
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: a level (`info`) or directives (`warn,pagoda=debug`). `RUST_LOG`,
    /// when set, wins.
    pub level: String,
    /// Seconds between two engine stats lines of `pagoda serve`; 0 = none.
    pub stats_interval_s: u64,
    /// Log the text of every prompt (off: prompts may hold personal data).
    pub prompts: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
            stats_interval_s: 10,
            prompts: false,
        }
    }
}

/// The `[nats]` section: how `pagoda serve` and `pagoda request` reach the NATS servers,
/// and which subjects they use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://host:4222`, `tls://host:4222`).
    pub url: String,
    /// Connection name shown by the server's monitoring (`nats server report connections`).
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// NKey seed (`SU…`), for servers with nkey authentication.
    pub nkey_seed: Option<String>,
    /// A `.creds` file (user JWT + nkey seed), for servers in operator mode.
    pub creds_file: Option<PathBuf>,
    /// PEM file of CA certificates that sign the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// Prefix of this connection's reply inboxes (`_INBOX` when unset); a server with
    /// per-client permissions lets each client read only its own (`configs/nats/`).
    pub inbox_prefix: Option<String>,
    /// Give up connecting after this long (ms).
    pub connect_timeout_ms: u64,
    /// Reconnect backoff doubles from a few ms up to this (ms).
    pub max_reconnect_delay_ms: u64,
    /// Keep trying when no server answers at start-up instead of failing.
    pub retry_on_initial_connect: bool,
    /// Subjects are `<subject_prefix>.generate` and `<subject_prefix>.cancel`.
    pub subject_prefix: String,
    /// Queue group of the generate endpoint: engines in one group share the requests.
    pub queue_group: String,
    /// Requests one engine holds at once (running or queued); more are answered with
    /// `overloaded` so a queue group peer or a retry can take them.
    pub max_in_flight: usize,
    /// On shutdown, in-flight requests get this long to finish before they are aborted (ms).
    pub drain_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            name: "pagoda".into(),
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            inbox_prefix: None,
            connect_timeout_ms: 5000,
            max_reconnect_delay_ms: 4000,
            retry_on_initial_connect: true,
            subject_prefix: "pagoda.v1".into(),
            queue_group: "pagoda".into(),
            max_in_flight: 1024,
            drain_timeout_ms: 10_000,
        }
    }
}

impl NatsConfig {
    /// The server URLs of `url`, trimmed, empty entries dropped.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn generate_subject(&self) -> String {
        format!("{}.generate", self.subject_prefix)
    }

    pub fn cancel_subject(&self) -> String {
        format!("{}.cancel", self.subject_prefix)
    }

    pub fn validate(&self) -> Result<(), pagoda_actors::config::ConfigError> {
        let err = |m: String| Err(pagoda_actors::config::ConfigError(m));
        if self.urls().is_empty() {
            return err("nats.url must name at least one server".into());
        }
        if !pagoda_actors::protocol::is_valid_subject(&self.subject_prefix) {
            return err(format!(
                "nats.subject_prefix {:?} is not a valid subject (dot-separated tokens, no wildcards or spaces)",
                self.subject_prefix
            ));
        }
        if self.queue_group.is_empty() || self.queue_group.chars().any(char::is_whitespace) {
            return err("nats.queue_group must be a non-empty word".into());
        }
        if self.max_in_flight == 0 {
            return err("nats.max_in_flight must be at least 1".into());
        }
        if let Some(p) = &self.inbox_prefix {
            if !pagoda_actors::protocol::is_valid_subject(p) {
                return err(format!("nats.inbox_prefix {p:?} is not a valid subject"));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return err("nats.tls_cert and nats.tls_key go together".into());
        }
        if self.user.is_some() != self.password.is_some() {
            return err("nats.user and nats.password go together".into());
        }
        let auths = [
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.creds_file.is_some(),
        ];
        if auths.iter().filter(|&&a| a).count() > 1 {
            return err(
                "choose one of nats.user/password, nats.token, nats.nkey_seed, nats.creds_file"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Command-line flags (and environment variables) for the `[nats]` section; each one set
/// wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma-separated (nats.url).
    #[arg(long, env = "PAGODA_NATS_URL")]
    pub nats_url: Option<String>,
    /// Connection name (nats.name).
    #[arg(long, env = "PAGODA_NATS_NAME")]
    pub nats_name: Option<String>,
    /// User name; goes with --nats-password (nats.user).
    #[arg(long, env = "PAGODA_NATS_USER")]
    pub nats_user: Option<String>,
    /// Password (nats.password); prefer the environment variable.
    #[arg(long, env = "PAGODA_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Authentication token (nats.token).
    #[arg(long, env = "PAGODA_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NKey seed (nats.nkey_seed).
    #[arg(long, env = "PAGODA_NATS_NKEY_SEED", hide_env_values = true)]
    pub nats_nkey_seed: Option<String>,
    /// Credentials file: user JWT + seed (nats.creds_file).
    #[arg(long, env = "PAGODA_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificates (PEM) for the server's TLS certificate (nats.tls_ca).
    #[arg(long, env = "PAGODA_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (nats.tls_cert).
    #[arg(long, env = "PAGODA_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (nats.tls_key).
    #[arg(long, env = "PAGODA_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS (nats.tls_required).
    #[arg(long)]
    pub nats_tls_required: bool,
    /// Subject prefix: <prefix>.generate, <prefix>.cancel (nats.subject_prefix).
    #[arg(long, env = "PAGODA_NATS_SUBJECT_PREFIX")]
    pub nats_subject_prefix: Option<String>,
    /// Prefix of this connection's reply inboxes, e.g. _INBOX.fraud (nats.inbox_prefix).
    #[arg(long, env = "PAGODA_NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
}

impl NatsArgs {
    /// Overrides the file's values with the flags that were given.
    pub fn apply(&self, cfg: &mut NatsConfig) {
        let set = |dst: &mut String, src: &Option<String>| {
            if let Some(v) = src {
                dst.clone_from(v);
            }
        };
        set(&mut cfg.url, &self.nats_url);
        set(&mut cfg.name, &self.nats_name);
        set(&mut cfg.subject_prefix, &self.nats_subject_prefix);
        if self.nats_inbox_prefix.is_some() {
            cfg.inbox_prefix.clone_from(&self.nats_inbox_prefix);
        }
        let opt = |dst: &mut Option<String>, src: &Option<String>| {
            if src.is_some() {
                dst.clone_from(src);
            }
        };
        opt(&mut cfg.user, &self.nats_user);
        opt(&mut cfg.password, &self.nats_password);
        opt(&mut cfg.token, &self.nats_token);
        opt(&mut cfg.nkey_seed, &self.nats_nkey_seed);
        let path = |dst: &mut Option<PathBuf>, src: &Option<PathBuf>| {
            if src.is_some() {
                dst.clone_from(src);
            }
        };
        path(&mut cfg.creds_file, &self.nats_creds);
        path(&mut cfg.tls_ca, &self.nats_tls_ca);
        path(&mut cfg.tls_cert, &self.nats_tls_cert);
        path(&mut cfg.tls_key, &self.nats_tls_key);
        if self.nats_tls_required {
            cfg.tls_required = true;
        }
    }
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
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error(transparent)]
    Invalid(#[from] pagoda_actors::config::ConfigError),
}

/// Prefix of the environment variables that override configuration keys:
/// `PAGODA_<SECTION>__<KEY>` (two underscores between section and key), e.g.
/// `PAGODA_SCHEDULER__MAX_NUM_SEQS=8` sets `scheduler.max_num_seqs`. Variables without the
/// double underscore (the flags' `PAGODA_NATS_URL` and friends) are not config keys.
pub const ENV_PREFIX: &str = "PAGODA_";

impl Config {
    /// Loads `path` (or `configs/default.toml` when it exists, or the built-in defaults),
    /// then applies the `PAGODA_<SECTION>__<KEY>` environment variables of this process.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigLoadError> {
        Self::load_file(path)?.with_env(std::env::vars())
    }

    /// Applies `PAGODA_<SECTION>__<KEY>=value` overrides (see [`ENV_PREFIX`]); other
    /// variables are ignored. A value is read as a TOML value (`8`, `true`, `1.5`) unless
    /// the key holds a string, where it is taken verbatim. An unknown key or a value of
    /// the wrong type is an error naming the variable.
    pub fn with_env(
        self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigLoadError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        if vars.is_empty() {
            return Ok(self);
        }
        vars.sort();
        let to_value = |cfg: &Config| {
            toml::Value::try_from(cfg).map_err(|e| ConfigLoadError::Env {
                var: String::new(),
                message: e.to_string(),
            })
        };
        let defaults = to_value(&Config::default())?;
        let mut cfg = self;
        for (var, raw) in vars {
            let env_err = |message: String| ConfigLoadError::Env {
                var: var.clone(),
                message,
            };
            let path = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let keys: Vec<&str> = path.split("__").collect();
            if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
                return Err(env_err(
                    "expected PAGODA_<SECTION>__<KEY> (or PAGODA_<SECTION>__<TABLE>__<KEY>), e.g. PAGODA_SCHEDULER__MAX_NUM_SEQS".into(),
                ));
            }
            let dotted = keys.join(".");
            let mut default = Some(&defaults);
            for k in &keys {
                default = default.and_then(|t| t.get(*k));
            }
            let value = match default {
                Some(toml::Value::String(_)) | None => toml::Value::String(raw.clone()),
                Some(_) => parse_toml_scalar(&raw)
                    .ok_or_else(|| env_err(format!("{raw:?} is not a valid value")))?,
            };
            let mut table = to_value(&cfg)?;
            let mut node = table
                .as_table_mut()
                .ok_or_else(|| env_err("configuration is not a table".into()))?;
            let (last, parents) = keys.split_last().expect("at least two keys");
            for k in parents {
                let child = node
                    .entry((*k).to_owned())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                node = child
                    .as_table_mut()
                    .ok_or_else(|| env_err(format!("{k} is not a section")))?;
            }
            node.insert((*last).to_owned(), value);
            cfg = table
                .try_into()
                .map_err(|e: toml::de::Error| env_err(format!("{dotted}: {}", e.message())))?;
        }
        Ok(cfg)
    }

    fn load_file(path: Option<&Path>) -> Result<Self, ConfigLoadError> {
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
        self.nats.validate()?;
        self.intake.validate()?;
        self.placement.validate()?;
        let err = |m: String| Err(pagoda_actors::config::ConfigError(m).into());
        if !self.metrics.listen.is_empty() && !self.metrics.listen.contains(':') {
            return err(format!(
                "metrics.listen {:?} is not HOST:PORT",
                self.metrics.listen
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err(format!("log.level {:?}: {e}", self.log.level));
        }
        Ok(())
    }
}

/// A TOML scalar (`8`, `true`, `1.5`, `"text"`, `[1, 2]`) from an environment variable.
fn parse_toml_scalar(raw: &str) -> Option<toml::Value> {
    #[derive(Deserialize)]
    struct V {
        v: toml::Value,
    }
    toml::from_str::<V>(&format!("v = {raw}")).ok().map(|v| v.v)
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
    fn nats_section() {
        let cfg = Config::parse(
            "[nats]\nurl = \"nats://a:4222, nats://b:4222,\"\nsubject_prefix = \"acme.llm\"\n",
        )
        .unwrap();
        assert_eq!(cfg.nats.urls(), vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(cfg.nats.generate_subject(), "acme.llm.generate");
        assert_eq!(cfg.nats.cancel_subject(), "acme.llm.cancel");
        assert_eq!(cfg.nats.queue_group, "pagoda");
        cfg.validate().unwrap();
        for bad in [
            "[nats]\nurl = \" , \"\n",
            "[nats]\nsubject_prefix = \"a.*\"\n",
            "[nats]\ntls_cert = \"c.pem\"\n",
            "[nats]\nuser = \"u\"\n",
            "[nats]\ntoken = \"t\"\nnkey_seed = \"SU\"\n",
        ] {
            assert!(Config::parse(bad).unwrap().validate().is_err(), "{bad}");
        }
        assert!(Config::parse("[nats]\nurls = \"x\"\n").is_err());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file() {
        let cfg = Config::parse("[scheduler]\nmax_num_seqs = 8\n[model]\nname = \"a\"\n")
            .unwrap()
            .with_env(env(&[
                ("PAGODA_SCHEDULER__MAX_NUM_SEQS", "4"),
                ("PAGODA_CACHE__ENABLE_PREFIX_CACHING", "false"),
                ("PAGODA_MODEL__NAME", "123"),
                ("PAGODA_METRICS__LISTEN", "127.0.0.1:0"),
                ("PAGODA_LOG__FORMAT", "json"),
                ("PAGODA_NATS__USER", "u"),
                ("PAGODA_INTAKE__STREAM__REPLICAS", "3"),
                ("PAGODA_LIMITS__ROLES", r#"["user", "assistant"]"#),
                ("PAGODA_PLACEMENT__ROLE", "engine"),
                ("PAGODA_NATS_URL", "ignored: a flag's variable"),
                ("HOME", "/root"),
            ]))
            .unwrap();
        assert_eq!(cfg.engine.scheduler.max_num_seqs, 4);
        assert!(!cfg.engine.cache.enable_prefix_caching);
        assert_eq!(cfg.engine.model.name, "123");
        assert_eq!(cfg.metrics.listen, "127.0.0.1:0");
        assert_eq!(cfg.log.format, LogFormat::Json);
        assert_eq!(cfg.nats.user.as_deref(), Some("u"));
        assert_eq!(cfg.intake.stream.replicas, 3);
        assert_eq!(cfg.engine.limits.roles, ["user", "assistant"]);
        assert_eq!(cfg.placement.role, Role::Engine);
        assert_eq!(cfg.nats.url, NatsConfig::default().url);
    }

    #[test]
    fn wrong_environment_keys_and_values_are_named() {
        for (var, value, needle) in [
            ("PAGODA_SCHEDULER__MAX_NUM_SEQ", "4", "max_num_seq"),
            (
                "PAGODA_SCHEDULER__MAX_NUM_SEQS",
                "many",
                "PAGODA_SCHEDULER__MAX_NUM_SEQS",
            ),
            ("PAGODA_LOG__FORMAT", "xml", "PAGODA_LOG__FORMAT"),
            ("PAGODA_NOPE__X", "1", "nope"),
            ("PAGODA_INTAKE__STREAM__REPLICA", "3", "replica"),
            ("PAGODA_INTAKE____X", "3", "PAGODA_INTAKE____X"),
        ] {
            let err = Config::default()
                .with_env(env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn bad_log_level_is_an_error() {
        let cfg = Config::parse("[log]\nlevel = \"info,=x=y\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn intake_section() {
        let cfg = Config::parse(
            "[intake]\nmode = \"jetstream\"\nmax_deliver = 5\n[intake.stream]\nstorage = \"memory\"\n",
        )
        .unwrap()
        .with_env(env(&[("PAGODA_INTAKE__ACK_WAIT_MS", "2000")]))
        .unwrap();
        assert_eq!(cfg.intake.mode, IntakeMode::Jetstream);
        assert_eq!(cfg.intake.max_deliver, 5);
        assert_eq!(cfg.intake.ack_wait_ms, 2000);
        assert_eq!(cfg.intake.stream.storage, StreamStorage::Memory);
        assert_eq!(cfg.intake.stream.name, "PAGODA_JOBS");
        cfg.validate().unwrap();
        for bad in [
            "[intake]\nmax_deliver = 0\n",
            "[intake]\ndurable_name = \"a.b\"\n",
            "[intake.stream]\nreplicas = 0\n",
        ] {
            assert!(Config::parse(bad).unwrap().validate().is_err(), "{bad}");
        }
        assert!(Config::parse("[intake]\nmode = \"kafka\"\n").is_err());
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let cfg = Config::parse("[scheduler]\nmax_num_seqs = 8\n").unwrap();
        assert_eq!(cfg.engine.scheduler.max_num_seqs, 8);
        assert_eq!(cfg.engine.cache.block_size, 16);
    }
}
