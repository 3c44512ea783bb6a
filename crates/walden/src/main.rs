//! The `walden` command: server roles, client commands and the benchmark.

mod auth;
mod backends;
mod cli;
mod cluster;
mod collections_cli;
mod config;
mod coord;
mod index_cli;
mod listener;
mod local_cluster;
mod node;
mod node_http;
mod proxy;
mod query_node;
mod search_cli;
mod search_metrics;
mod server;
mod standalone;
mod tls;
mod wal_cli;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use walden_common::HasErrorCode;

const DEFAULT_ADDR: &str = "127.0.0.1:19540";

#[derive(Parser, Debug)]
#[command(
    name = "walden",
    version,
    about = "Walden: a log-centric streaming service for vector data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum NodeAction {
    /// Move every pchannel off a node (it stays up, serving nothing).
    Drain {
        /// The node's id (`walden status --addr COORD`).
        id: u64,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum BalanceCmd {
    /// Move one pchannel to a node, under a new term.
    Move {
        #[arg(long)]
        pchannel: String,
        /// The node's id (`walden status --addr COORD`).
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        conn: cli::ConnArgs,
    },
}

/// Where Milvus's API is served.
#[derive(clap::Args, Debug)]
struct MilvusArgs {
    /// Milvus's gRPC API (pymilvus) address ("" disables) [default: 127.0.0.1:19530].
    #[arg(long)]
    milvus_listen: Option<String>,
}

/// Where a server listens and what it reads at start.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// gRPC listen address [default: 127.0.0.1:19540].
    #[arg(long)]
    listen: Option<String>,
    /// HTTP address for /metrics and /healthz ("" disables) [default: 127.0.0.1:19541].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A TOML config file (see walden.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Once serving, write the bound addresses here as JSON (`{"grpc":..,"http":..}`):
    /// with port 0 in --listen, how a script learns the port the kernel picked.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Where a server keeps its WAL.
#[derive(clap::Args, Debug)]
struct WalArgs {
    /// Where the WAL and metastore live [default: ./walden-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the WAL lives (`wal.storage`) [default: local; a cluster node needs object].
    #[arg(long, value_enum)]
    wal_storage: Option<config::WalStorageKind>,
    /// The object store for `--wal-storage object` (`object_store.url`): file:///abs/dir,
    /// memory:// or s3://bucket/prefix.
    #[arg(long)]
    object_store: Option<String>,
    /// An S3-compatible endpoint (`object_store.endpoint`); an http:// one given here also
    /// sets `object_store.allow_http`.
    #[arg(long)]
    object_store_endpoint: Option<String>,
}

/// How a cluster role finds the others.
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// etcd client URLs, comma-separated, as etcd prints them (`cluster.etcd`)
    /// [default: http://127.0.0.1:2379].
    #[arg(long)]
    etcd: Option<String>,
    /// The address others reach this process at (`cluster.advertise`) [default: the bound
    /// --listen address].
    #[arg(long)]
    advertise: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every role in one process on embedded defaults (local WAL, embedded metastore).
    Standalone {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        wal: WalArgs,
        #[command(flatten)]
        milvus: MilvusArgs,
    },
    /// Run a streaming coordinator of a cluster (one leads, the others stand by).
    Coord {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Run a proxy of a cluster: Milvus's gRPC API (pymilvus) on --listen [default:
    /// 127.0.0.1:19530], calling the cluster through Walden's client. Stateless: run any
    /// number of them.
    Proxy {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Run a query node of a cluster: it holds the flushed segments the coordinator places on
    /// it and serves their searches to the delegators.
    QueryNode {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        wal: WalArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Run a streaming node of a cluster: it serves the pchannels the coordinator assigns it.
    /// (`walden node drain ID` drains a running one.)
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        wal: WalArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Append one message per stdin line (the line is the payload).
    Produce {
        #[arg(long)]
        pchannel: String,
        #[arg(long)]
        vchannel: String,
        /// Message type of every message.
        #[arg(long, default_value = "Data")]
        r#type: String,
        /// Messages in flight at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Seconds to keep retrying through retryable errors (node restarting, channel moving).
        /// (30 s, like the client's default: a pchannel whose node died moves within the
        /// node lease, 10 s by default, plus recovery.)
        #[arg(long, default_value_t = 30.0)]
        retry_timeout: f64,
        #[command(flatten)]
        conn: cli::ConnArgs,
        /// One JSON object per acknowledged message.
        #[arg(long)]
        json: bool,
    },
    /// Print a pchannel's messages in tick order.
    Consume {
        #[arg(long)]
        pchannel: String,
        /// Only this vchannel.
        #[arg(long)]
        vchannel: Option<String>,
        /// all | latest | after:ID | from:ID | tick-gt:T
        #[arg(long, default_value = "all")]
        from: String,
        /// Exit after printing this many messages.
        #[arg(long)]
        limit: Option<u64>,
        /// Exit 0 once no message other than a TimeTick arrived for this many seconds.
        #[arg(long)]
        idle_exit: Option<f64>,
        /// Also print TimeTick messages.
        #[arg(long)]
        show_ticks: bool,
        #[command(flatten)]
        conn: cli::ConnArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pchannels, terms, last ticks and WAL sizes of a node.
    Status {
        #[command(flatten)]
        conn: cli::ConnArgs,
        #[arg(long)]
        json: bool,
    },
    /// Move pchannels between a cluster's nodes.
    #[command(subcommand)]
    Balance(BalanceCmd),
    /// Measure throughput and latency.
    Bench(walden_bench::BenchArgs),
    /// Create, describe, list and drop collections.
    #[command(subcommand)]
    Collection(collections_cli::CollectionCmd),
    /// Create and drop partitions.
    #[command(subcommand)]
    Partition(collections_cli::PartitionCmd),
    /// Insert rows into a collection.
    Insert(collections_cli::WriteArgs),
    /// Insert rows, replacing rows with the same primary key.
    Upsert(collections_cli::WriteArgs),
    /// Delete rows by primary key.
    Delete {
        #[arg(long)]
        collection: String,
        /// Comma-separated primary keys.
        #[arg(long)]
        ids: String,
        #[arg(long)]
        partition: Option<String>,
        #[command(flatten)]
        retry: collections_cli::RetryArgs,
        #[command(flatten)]
        common: collections_cli::Common,
    },
    /// Offline tools for the local WAL: check it, skip damaged records.
    #[command(subcommand)]
    Wal(wal_cli::WalCmd),
    /// Seal every growing segment of a collection (and, with --wait, wait until they are
    /// flushed to Parquet and in the manifest).
    Flush {
        #[arg(long)]
        collection: String,
        /// Return once every segment this sealed is flushed and committed.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 300.0)]
        wait_timeout: f64,
        #[command(flatten)]
        common: collections_cli::Common,
    },
    /// A collection's segments: growing, sealed, flushed and compacted, with their files.
    Segments {
        #[arg(long)]
        collection: String,
        #[command(flatten)]
        common: collections_cli::Common,
    },
    /// Vector indexes: create, describe, drop.
    #[command(subcommand)]
    Index(index_cli::IndexCmd),
    /// The nearest rows to query vectors, over growing and flushed data.
    Search(search_cli::SearchArgs),
    /// Rows matching a filter.
    Query(search_cli::QueryArgs),
    /// Rows by primary key.
    Get(search_cli::GetArgs),
    /// How many rows match a filter.
    Count(search_cli::CountArgs),
}

pub(crate) fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        s.is_finite() && s >= 0.0,
        "{flag} must be a non-negative number of seconds (got {s})"
    );
    Ok(Duration::from_secs_f64(s))
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a terminal: a log file or collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A server role's configuration: the file, then the command line over it; `None` for the
/// client commands.
fn server_config(command: &Command) -> anyhow::Result<Option<config::Config>> {
    let (serve, wal, cluster) = match command {
        Command::Standalone { serve, wal, .. } => (serve, Some(wal), None),
        Command::Coord { serve, cluster } | Command::Proxy { serve, cluster } => {
            (serve, None, Some(cluster))
        }
        Command::Node {
            action: None,
            serve,
            wal,
            cluster,
        }
        | Command::QueryNode {
            serve,
            wal,
            cluster,
        } => (serve, Some(wal), Some(cluster)),
        _ => return Ok(None),
    };
    let mut cfg = config::Config::load(serve.config.as_deref())?;
    if let Some(l) = &serve.listen {
        // A proxy's one listener is Milvus's API.
        if matches!(command, Command::Proxy { .. }) {
            cfg.milvus.listen = l.clone();
        } else {
            cfg.server.listen = l.clone();
        }
    }
    if let Some(m) = &serve.metrics_listen {
        cfg.server.metrics_listen = m.clone();
    }
    if let Some(w) = wal {
        if let Some(d) = &w.data_dir {
            cfg.server.data_dir = d.clone();
        }
        if let Some(s) = w.wal_storage {
            cfg.wal.storage = s;
        }
        if let Some(u) = &w.object_store {
            cfg.object_store.url = u.clone();
        }
        if let Some(e) = &w.object_store_endpoint {
            cfg.object_store.endpoint = e.clone();
            cfg.object_store.allow_http |= e.starts_with("http://");
        }
    }
    if let Some(c) = cluster {
        if let Some(e) = &c.etcd {
            cfg.cluster.etcd = e.clone();
        }
        if let Some(a) = &c.advertise {
            cfg.cluster.advertise = a.clone();
        }
    }
    if let Command::Standalone { milvus, .. } = command
        && let Some(l) = &milvus.milvus_listen
    {
        cfg.milvus.listen = l.clone();
    }
    cfg.validate()?;
    Ok(Some(cfg))
}

/// Tokio workers: the configured number, else `TOKIO_WORKER_THREADS`, else one fewer than the
/// cores (at least one). The WAL's writer and segment preparer are threads of their own that
/// block in `write` and `fdatasync`; with a worker on every core they compete with it, and each
/// hand-off between workers costs a wake-up. Measured with `walden bench append` on 2 cores, server and client
/// at one worker each: one append in flight p50 0.388 → 0.297 ms; 64 in flight: same
/// throughput, server CPU per append 23–25 → 20.6 µs.
fn worker_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .max(1)
}

async fn run(cli: Cli, server: Option<config::Config>) -> anyhow::Result<()> {
    match cli.command {
        // `main` read the config (it sizes the runtime); nothing is loaded twice.
        Command::Standalone { serve, .. } => {
            let cfg = server.unwrap_or_default();
            init_logging(&cfg.log.level, cfg.log.format == config::LogFormat::Json);
            standalone::run(cfg, serve.ready_file).await
        }
        Command::Coord { serve, .. } => {
            let cfg = server.unwrap_or_default();
            init_logging(&cfg.log.level, cfg.log.format == config::LogFormat::Json);
            coord::run(cfg, serve.ready_file).await
        }
        Command::Node {
            action: Some(NodeAction::Drain { id, conn }),
            ..
        } => cli::drain_node(&conn, id).await,
        Command::Balance(BalanceCmd::Move { pchannel, to, conn }) => {
            cli::move_pchannel(&conn, &pchannel, to).await
        }
        Command::Proxy { serve, .. } => {
            let cfg = server.unwrap_or_default();
            init_logging(&cfg.log.level, cfg.log.format == config::LogFormat::Json);
            proxy::run(cfg, serve.ready_file).await
        }
        Command::QueryNode { serve, .. } => {
            let cfg = server.unwrap_or_default();
            init_logging(&cfg.log.level, cfg.log.format == config::LogFormat::Json);
            query_node::run(cfg, serve.ready_file).await
        }
        Command::Node { serve, .. } => {
            let cfg = server.unwrap_or_default();
            init_logging(&cfg.log.level, cfg.log.format == config::LogFormat::Json);
            node::run(cfg, serve.ready_file).await
        }
        Command::Produce {
            pchannel,
            vchannel,
            r#type,
            in_flight,
            retry_timeout,
            conn,
            json,
        } => {
            let t = walden_message::parse_type_name(&r#type)
                .ok_or_else(|| anyhow::anyhow!("unknown message type {type:?}", type = r#type))?;
            let options = walden_client::ProducerOptions {
                max_in_flight: in_flight.max(1),
                retry_timeout: seconds("--retry-timeout", retry_timeout)?,
                ..walden_client::ProducerOptions::default()
            };
            cli::produce(&conn, &pchannel, &vchannel, t, options, json).await
        }
        Command::Consume {
            pchannel,
            vchannel,
            from,
            limit,
            idle_exit,
            show_ticks,
            conn,
            json,
        } => {
            let idle_exit = idle_exit.map(|s| seconds("--idle-exit", s)).transpose()?;
            cli::consume(cli::ConsumeArgs {
                conn: &conn,
                pchannel: &pchannel,
                vchannel,
                from: cli::parse_from(&from)?,
                limit,
                idle_exit,
                show_ticks,
                json,
            })
            .await
        }
        Command::Status { conn, json } => cli::status(&conn, json).await,
        Command::Bench(args) => {
            init_logging("warn", false);
            walden_bench::run(args).await
        }
        Command::Collection(cmd) => collections_cli::collection(cmd).await,
        Command::Partition(cmd) => collections_cli::partition(cmd).await,
        Command::Insert(args) => collections_cli::write(args, false).await,
        Command::Upsert(args) => collections_cli::write(args, true).await,
        Command::Delete {
            collection,
            ids,
            partition,
            retry,
            common,
        } => {
            collections_cli::delete(&collection, &ids, partition.as_deref(), &retry, &common).await
        }
        Command::Flush {
            collection,
            wait,
            wait_timeout,
            common,
        } => {
            let wait = wait
                .then(|| seconds("--wait-timeout", wait_timeout))
                .transpose()?;
            collections_cli::flush(&collection, wait, &common).await
        }
        Command::Segments { collection, common } => {
            collections_cli::segments(&collection, &common).await
        }
        Command::Index(cmd) => index_cli::run(cmd).await,
        Command::Search(a) => search_cli::search(a).await,
        Command::Query(a) => search_cli::query(a).await,
        Command::Get(a) => search_cli::get(a).await,
        Command::Count(a) => search_cli::count(a).await,
        Command::Wal(cmd) => wal_cli::run(cmd),
    }
}

/// mimalloc keeps freed pages for reuse where glibc's malloc hands them back and faults fresh
/// ones in again (8% of the server's samples under `walden bench append` were `clear_page`).
/// Built without transparent huge pages (`no_thp`): received payloads stay in the write-ahead
/// buffer, so the server keeps taking fresh memory, and a fault on a huge-page region zeroes
/// 2 MiB at once; `perf` showed the tokio worker on the CPU for 30–40 ms at a time doing only
/// that. Append p99 at 18 000 msg/s: 17–66 → 4.6–7.2 ms.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One TLS crypto provider for the process, chosen here: with rustls built with more than one
    // (object_store's `aws` feature brings aws-lc-rs beside tonic's ring), rustls cannot pick
    // one by itself and tonic's TLS panicked at the first handshake.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let server = match server_config(&cli.command) {
        Ok(c) => c,
        Err(e) => return failure(&e),
    };
    let workers = worker_threads(server.as_ref().map_or(0, |c| c.server.worker_threads));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, server)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&e),
    }
}

/// Prints the error on one line, always with a stable code: the one a typed error anywhere in
/// the chain carries, else INVALID_ARGUMENT (what is left untyped is the command's own input:
/// flags, files, the config).
fn failure(e: &anyhow::Error) -> ExitCode {
    let text = format!("{e:#}").replace('\n', " ");
    let code = error_code(e);
    let suffix = if text.contains(&code.to_string()) {
        String::new()
    } else {
        format!(" [{code}]")
    };
    eprintln!("error: {text}{suffix}");
    ExitCode::FAILURE
}

fn error_code(e: &anyhow::Error) -> walden_common::ErrorCode {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<walden_client::ClientError>()
                .map(HasErrorCode::code)
                .or_else(|| c.downcast_ref::<cli::CliError>().map(|e| e.code))
                .or_else(|| {
                    c.downcast_ref::<walden_schema::SchemaError>()
                        .map(HasErrorCode::code)
                })
                .or_else(|| {
                    c.downcast_ref::<walden_streaming_node::NodeError>()
                        .map(HasErrorCode::code)
                })
        })
        .unwrap_or(walden_common::ErrorCode::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn worker_threads_default_leaves_a_core_for_the_wal_writer_and_is_never_zero() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
            return; // the environment decides; nothing of the default to check
        }
        let auto = worker_threads(0);
        // Tokio panics on zero workers; on one core the writer has to share.
        assert!(auto >= 1);
        assert_eq!(auto, cores.saturating_sub(1).max(1));
        assert_eq!(worker_threads(5), 5, "a configured count is taken as it is");
    }
}
