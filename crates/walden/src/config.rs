//! The config file (TOML). Every key is optional; `walden.example.toml` documents each with its
//! default.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use walden_delegator::QueryConfig;
use walden_flusher::{FlushConfig, RetentionConfig};
use walden_object_store::ObjectStoreConfig;
use walden_streaming_node::NodeConfig;
use walden_wal_local::LocalWalConfig;
use walden_wal_object::ObjectWalConfig;

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub node: NodeConfig,
    pub wal: WalConfig,
    pub wal_local: WalLocalConfig,
    pub wal_object: WalObjectConfig,
    pub object_store: ObjectStoreConfig,
    pub flush: FlushConfig,
    pub query: QueryConfig,
    pub cluster: ClusterConfig,
    pub milvus: MilvusConfig,
    pub log: LogConfig,
}

/// `[milvus]`: Milvus's gRPC API (what pymilvus speaks), served by `walden standalone`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MilvusConfig {
    /// Its address (also `--milvus-listen`); empty turns it off. Default `127.0.0.1:19530`,
    /// Milvus's own port.
    pub listen: String,
}

impl Default for MilvusConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:19530".into(),
        }
    }
}

/// `[cluster]`: how `walden coord` and `walden node` find each other and behave. Standalone
/// reads only `tls_ca_file` (its Milvus API calls the server over TLS).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd client URLs, comma-separated (also `--etcd`). Default `http://127.0.0.1:2379`.
    pub etcd: String,
    /// The address other processes and clients reach this one at; empty: the bound
    /// `server.listen` (which must not then be a wildcard). Default empty.
    pub advertise: String,
    /// A node's registration lease: its pchannels move this long after it dies. Default 10 000.
    pub node_lease_ttl_ms: u64,
    /// The coordinator leader's lease: a standby leads this long after the leader dies.
    /// Default 10 000.
    pub coord_lease_ttl_ms: u64,
    /// Assignments in flight at once over the whole cluster. Default 64.
    pub max_moves_in_flight: usize,
    /// An assignment a node has not confirmed by then is failed and placed again. Default 60 000.
    pub open_timeout_ms: u64,
    /// Ticks a node fetches from the leader at once... Default 4096.
    pub tick_batch: u32,
    /// ...and the longest it uses a batch, so ticks stay near the clock. Default 50.
    pub tick_batch_max_age_ms: u64,
    /// On SIGTERM a node waits at most this long for its pchannels to move. Default 60 000.
    pub drain_timeout_ms: u64,
    /// PEM certificate(s) of the authority that signed the cluster's server certificates:
    /// what a process checks when it calls another (the leader's clock, the catalog, query
    /// nodes, a pchannel's owner). Required when `server.tls_cert_file` is set. Default none.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd: "http://127.0.0.1:2379".into(),
            advertise: String::new(),
            node_lease_ttl_ms: 10_000,
            coord_lease_ttl_ms: 10_000,
            max_moves_in_flight: 64,
            open_timeout_ms: 60_000,
            tick_batch: 4096,
            tick_batch_max_age_ms: 50,
            drain_timeout_ms: 60_000,
            tls_ca_file: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// Default `local`.
    pub storage: WalStorageKind,
    /// `[wal.retention]`: what the WAL keeps after it is flushed (defaults: 10 min, 0 bytes).
    pub retention: RetentionConfig,
}

/// Where the WAL keeps the pchannels' logs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WalStorageKind {
    /// Segment files under `server.data_dir` (`[wal_local]`).
    #[default]
    Local,
    /// Fragment objects in `[object_store]` (`[wal_object]`): nothing on the node's disk must
    /// survive.
    Object,
}

/// `[wal_object]`: the object-storage WAL (used with `wal.storage = "object"`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WalObjectConfig {
    /// A fragment object is cut once its records reach this many bytes. Default 4 MiB.
    pub fragment_bytes: usize,
    /// Longest a record waits for others to share its fragment while an upload slot is free;
    /// raising it trades latency for fewer PUTs. Default 0 (upload at once).
    pub flush_interval_ms: u64,
    /// Fragment uploads in flight at once. Default 8.
    pub max_uploads_in_flight: usize,
    /// A segment is sealed at this many bytes... Default 256 MiB.
    pub segment_bytes: u64,
    /// ... or fragments... Default 4096.
    pub segment_max_fragments: u32,
    /// ... or this age. Default 600 000 ms.
    pub segment_max_age_ms: u64,
    /// Fragments a catch-up reader fetches ahead in parallel. Default 8.
    pub read_ahead: usize,
}

impl Default for WalObjectConfig {
    fn default() -> Self {
        let d = ObjectWalConfig::default();
        Self {
            fragment_bytes: d.fragment_bytes,
            flush_interval_ms: d.flush_interval.as_millis() as u64,
            max_uploads_in_flight: d.max_uploads_in_flight,
            segment_bytes: d.segment_bytes,
            segment_max_fragments: d.segment_max_fragments,
            segment_max_age_ms: d.segment_max_age.as_millis() as u64,
            read_ahead: d.read_ahead,
        }
    }
}

impl From<&WalObjectConfig> for ObjectWalConfig {
    fn from(c: &WalObjectConfig) -> Self {
        let ms = std::time::Duration::from_millis;
        Self {
            fragment_bytes: c.fragment_bytes,
            flush_interval: ms(c.flush_interval_ms),
            max_uploads_in_flight: c.max_uploads_in_flight,
            segment_bytes: c.segment_bytes,
            segment_max_fragments: c.segment_max_fragments,
            segment_max_age: ms(c.segment_max_age_ms),
            read_ahead: c.read_ahead,
        }
    }
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
    /// Most gRPC connections at once; more are closed as they arrive (and logged, at most
    /// every 10 s). Lowered at start to what the open-file limit leaves. Default 10 000.
    pub max_connections: usize,
    /// A connection that has not sent the HTTP/2 preface by then is closed. Default 10 000.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 keepalive: a connection is pinged after this long without frames... Default
    /// 20 000.
    pub keepalive_interval_ms: u64,
    /// ...and closed when the ping is not answered within this. Default 20 000.
    pub keepalive_timeout_ms: u64,
    /// PEM certificate chain and private key: both set turns TLS on for gRPC and HTTP.
    /// Default: none (plaintext).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Bearer tokens, one per line (read again on SIGHUP): every call must carry one.
    /// Default: none (no authentication).
    pub auth_token_file: Option<PathBuf>,
    /// With tokens on, `/healthz` still answers without one. Default false.
    pub public_healthz: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:19540".into(),
            metrics_listen: "127.0.0.1:19541".into(),
            data_dir: PathBuf::from("./walden-data"),
            worker_threads: 0,
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 20_000,
            keepalive_timeout_ms: 20_000,
            tls_cert_file: None,
            tls_key_file: None,
            auth_token_file: None,
            public_healthz: false,
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
    /// Default `shared`.
    pub layout: WalLayout,
    /// Writes are refused (RESOURCE_EXHAUSTED) while fewer bytes are free on the WAL's file
    /// system, and pre-allocation never goes below it. Default 128 MiB.
    pub min_free_bytes: u64,
}

/// How the local WAL lays out its pchannels.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WalLayout {
    /// Every pchannel in one log, one group commit (and one fdatasync) for all of them.
    #[default]
    Shared,
    /// One log and one writer per pchannel.
    PerPchannel,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for WalLocalConfig {
    fn default() -> Self {
        let d = LocalWalConfig::default();
        Self {
            segment_bytes: d.segment_bytes,
            max_batch_bytes: d.max_batch_bytes,
            layout: WalLayout::Shared,
            min_free_bytes: d.min_free_bytes,
        }
    }
}

impl From<&WalLocalConfig> for LocalWalConfig {
    fn from(c: &WalLocalConfig) -> Self {
        Self {
            segment_bytes: c.segment_bytes,
            max_batch_bytes: c.max_batch_bytes,
            min_free_bytes: c.min_free_bytes,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter (`info`, `walden=debug,info`, ...); `RUST_LOG` overrides it. Default `info`.
    pub level: String,
    /// Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
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
        let o = &self.wal_object;
        for (key, v) in [
            ("fragment_bytes", o.fragment_bytes as u64),
            ("max_uploads_in_flight", o.max_uploads_in_flight as u64),
            ("segment_bytes", o.segment_bytes),
            ("segment_max_fragments", u64::from(o.segment_max_fragments)),
            ("segment_max_age_ms", o.segment_max_age_ms),
            ("read_ahead", o.read_ahead as u64),
        ] {
            anyhow::ensure!(v > 0, "wal_object.{key} must be at least 1");
        }
        if !self.object_store.url.is_empty() {
            self.object_store.validate().map_err(anyhow::Error::msg)?;
        }
        self.flush.validate().map_err(anyhow::Error::msg)?;
        check_log_level(&self.log.level)?;
        let c = &self.cluster;
        for (key, v) in [
            ("node_lease_ttl_ms", c.node_lease_ttl_ms),
            ("coord_lease_ttl_ms", c.coord_lease_ttl_ms),
        ] {
            anyhow::ensure!(
                v >= 1000,
                "cluster.{key} must be at least 1000 (etcd counts leases in seconds)"
            );
        }
        for (key, v) in [
            ("max_moves_in_flight", c.max_moves_in_flight as u64),
            ("open_timeout_ms", c.open_timeout_ms),
            ("tick_batch", u64::from(c.tick_batch)),
            ("tick_batch_max_age_ms", c.tick_batch_max_age_ms),
        ] {
            anyhow::ensure!(v > 0, "cluster.{key} must be at least 1");
        }
        let s = &self.server;
        anyhow::ensure!(
            s.max_connections > 0,
            "server.max_connections must be at least 1"
        );
        for (key, ms) in [
            ("handshake_timeout_ms", s.handshake_timeout_ms),
            ("keepalive_interval_ms", s.keepalive_interval_ms),
            ("keepalive_timeout_ms", s.keepalive_timeout_ms),
        ] {
            anyhow::ensure!(ms > 0, "server.{key} must be at least 1");
        }
        anyhow::ensure!(
            s.tls_cert_file.is_some() == s.tls_key_file.is_some(),
            "server.tls_cert_file and server.tls_key_file are set together"
        );
        Ok(())
    }
}

/// Levels a log directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Refuses a `log.level` that tracing would take as something else: a bare word that is not a
/// level (`infoo`) reads as a target name, which turned every other log line off without a
/// word. Accepted: comma-separated `LEVEL`, `TARGET=LEVEL` or `TARGET` (a target at every
/// level) where TARGET contains `::` or names a Walden crate.
fn check_log_level(filter: &str) -> anyhow::Result<()> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.split_once('=') {
            Some((_, level)) => level,
            None if directive.contains("::") || directive.starts_with("walden") => continue,
            None => directive,
        };
        anyhow::ensure!(
            LEVELS.contains(&level.to_ascii_lowercase().as_str()),
            "log.level {filter:?}: {level:?} is not a level (one of {})",
            LEVELS.join(", ")
        );
    }
    Ok(())
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
        assert!(Config::parse("[wal_local]\nlayout = \"sharded\"").is_err());
        assert!(Config::parse("[wal]\nstorage = \"s3\"").is_err());
        assert!(Config::parse("[wal_object]\nmax_uploads_in_flight = 0").is_err());
        let c = Config::parse("[wal]\nstorage = \"object\"\n[object_store]\nurl = \"s3://b/p\"")
            .unwrap();
        assert_eq!(c.wal.storage, WalStorageKind::Object);
        let e = Config::parse("[log]\nlevel = \"infoo\"").unwrap_err();
        assert!(format!("{e:#}").contains("not a level"), "{e:#}");
        assert!(Config::parse("[log]\nlevel = \"walden=debug,tower=warn,INFO\"").is_ok());
        let c = Config::parse("[node]\npchannels = 2").unwrap();
        assert_eq!(c.node.pchannel_names(), ["walden-dml-0", "walden-dml-1"]);
    }
}
