//! The config file (TOML). Every key is optional; `walden.example.toml` documents each with its
//! default.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use walden_streaming_node::NodeConfig;
use walden_wal_local::LocalWalConfig;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub node: NodeConfig,
    pub wal_local: WalLocalConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC address. Default `127.0.0.1:19540`.
    pub listen: String,
    /// HTTP address for `/metrics` and `/healthz`; empty disables it. Default `127.0.0.1:19541`.
    pub metrics_listen: String,
    /// Where the WAL and the metastore live. Default `./walden-data`.
    pub data_dir: PathBuf,
    /// Tokio worker threads. Default 0: one fewer than the cores, at least one (the WAL writer
    /// is a thread of its own and needs a core).
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:19540".into(),
            metrics_listen: "127.0.0.1:19541".into(),
            data_dir: PathBuf::from("./walden-data"),
            worker_threads: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalLocalConfig {
    /// Segment size before a new segment is started. Default 64 MiB.
    pub segment_bytes: u64,
    /// Most bytes one group commit writes. Default 4 MiB.
    pub max_batch_bytes: usize,
    /// `shared`: every pchannel in one log, one group commit (and one fdatasync) for all of
    /// them; `per_pchannel`: one log and one writer per pchannel. Default `shared`.
    pub layout: String,
}

impl Default for WalLocalConfig {
    fn default() -> Self {
        let d = LocalWalConfig::default();
        Self {
            segment_bytes: d.segment_bytes,
            max_batch_bytes: d.max_batch_bytes,
            layout: "shared".into(),
        }
    }
}

impl From<&WalLocalConfig> for LocalWalConfig {
    fn from(c: &WalLocalConfig) -> Self {
        Self {
            segment_bytes: c.segment_bytes,
            max_batch_bytes: c.max_batch_bytes,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `walden=debug,info`, ...); `RUST_LOG` overrides it. Default `info`.
    pub level: String,
    /// `text` or `json`. Default `text`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl Config {
    /// Reads `path`, or the defaults if none is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let c: Self = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.node.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.wal_local.segment_bytes >= 4096,
            "wal_local.segment_bytes must be at least 4096"
        );
        anyhow::ensure!(
            matches!(self.wal_local.layout.as_str(), "shared" | "per_pchannel"),
            "wal_local.layout must be `shared` or `per_pchannel`"
        );
        anyhow::ensure!(
            matches!(self.log.format.as_str(), "text" | "json"),
            "log.format must be `text` or `json`"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_states_every_default() {
        let text = include_str!("../../../walden.example.toml");
        let parsed = Config::parse(text).expect("example parses");
        assert_eq!(
            parsed,
            Config::default(),
            "the example must show the defaults"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::parse("[server]\nlisten_typo = \"x\"").is_err());
        assert!(Config::parse("[node]\npchannels = 0").is_err());
        assert!(Config::parse("[log]\nformat = \"xml\"").is_err());
        let c = Config::parse("[node]\npchannels = 2").unwrap();
        assert_eq!(c.node.pchannel_names(), ["walden-dml-0", "walden-dml-1"]);
    }
}
