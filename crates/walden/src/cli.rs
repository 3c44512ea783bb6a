//! The client commands: produce, consume, status.

use std::{io::Write as _, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use walden_client::{
    AppendResult, Client, ClientError, ConsumerOptions, DeliverFrom, ProducerOptions,
};
use walden_common::{ErrorCode, HasErrorCode, MessageId, TimeTick};
use walden_message::{ImmutableMessage, MessageType, MutableMessage, type_name};

/// Where and how every client command connects.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    #[arg(long, env = "WALDEN_ADDR", default_value = crate::DEFAULT_ADDR)]
    pub addr: String,
    /// Bearer token, for a node with `server.auth_token_file`.
    #[arg(long, env = "WALDEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the authority that signed the node's certificate; turns TLS on.
    #[arg(long, env = "WALDEN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

pub async fn connect(conn: &ConnArgs) -> anyhow::Result<Client> {
    let tls_ca_pem = match &conn.tls_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("--tls-ca {}", p.display()))?),
        None => None,
    };
    let options = walden_client::ConnectOptions {
        token: conn.token.clone(),
        tls_ca_pem,
    };
    Ok(Client::connect_with(&conn.addr, &options).await?)
}

/// One message per stdin line. Every line gets exactly one output line, in input order: its
/// acknowledgement, or why it was not written (with its line number), or that it is in doubt
/// (sent, never acknowledged: it may be in the WAL). A refused line does not stop the lines
/// after it, and the command fails at the end if any line was not acknowledged, so the WAL
/// holds every line shown as written, no line shown as not written, and perhaps lines in doubt.
pub async fn produce(
    conn: &ConnArgs,
    pchannel: &str,
    vchannel: &str,
    message_type: MessageType,
    mut options: ProducerOptions,
    json_out: bool,
) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    let addr = &conn.addr;
    // An unknown pchannel is refused at once, not after the producer's retries (a pchannel
    // that is moving is still in the topology).
    if !client.has_pchannel(pchannel).await? {
        return Err(CliError {
            code: ErrorCode::ChannelNotFound,
            message: format!(
                "pchannel {} is not served by {addr}",
                walden_common::quote_short(pchannel)
            ),
        }
        .into());
    }
    // The owner's own limit, so that a line it would refuse is refused here without being
    // buffered whole or sent.
    let limit = match client.status_of(pchannel).await {
        Ok(s) => s.max_message_bytes as usize,
        Err(_) => 0, // moving: the default limit, and the producer waits for the owner
    };
    if limit > 0 {
        options.max_message_bytes = limit;
    }
    let limit = options.max_message_bytes;
    let in_flight = options.max_in_flight;
    let producer = client.producer(pchannel, options);
    // Results are awaited in send order by a printer task, so output follows input order.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, String, Outcome)>(in_flight.max(1));
    let vchannel_owned = vchannel.to_owned();
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        let mut err = tokio::io::stderr();
        let (mut failed, mut in_doubt, mut first_failure) = (0u64, 0u64, None);
        while let Some((line_no, line, outcome)) = rx.recv().await {
            let result = match outcome {
                Outcome::Pending(fut) => fut.await,
                Outcome::Refused(e) => Err(e),
            };
            match result {
                Ok(r) => {
                    let text = if json_out {
                        json!({
                            "line": line_no,
                            "message_id": r.id.0,
                            "time_tick": r.tick.0,
                            "vchannel": vchannel_owned,
                            "payload": line,
                        })
                        .to_string()
                    } else {
                        format!(
                            "id={} tick={} vchannel={} {line}",
                            r.id, r.tick, vchannel_owned
                        )
                    };
                    out.write_all(text.as_bytes()).await?;
                    out.write_all(b"\n").await?;
                }
                Err(e) => {
                    failed += 1;
                    let code = e.code();
                    let unconfirmed = matches!(e, ClientError::Unconfirmed(_));
                    in_doubt += u64::from(unconfirmed);
                    let fate = if unconfirmed {
                        "in doubt"
                    } else {
                        "not written"
                    };
                    let detail = format!("line {line_no}: {fate}: {e}");
                    let detail = if detail.contains(&code.to_string()) {
                        detail
                    } else {
                        format!("{detail} [{code}]")
                    };
                    if json_out {
                        let doc = json!({
                            "line": line_no,
                            "in_doubt": unconfirmed,
                            "error": {"code": code.as_u32(), "name": code.name(), "message": e.to_string()},
                        });
                        out.write_all(format!("{doc}\n").as_bytes()).await?;
                    }
                    err.write_all(format!("{detail}\n").as_bytes()).await?;
                    first_failure.get_or_insert((detail, code));
                }
            }
        }
        out.flush().await?;
        anyhow::Ok((failed, in_doubt, first_failure))
    });
    let mut input = LineReader::new(tokio::io::stdin(), limit);
    let mut line_no = 0u64;
    let mut sent = 0u64;
    while let Some(line) = input.next_line().await.context("reading stdin")? {
        line_no += 1;
        let (text, outcome) = match line {
            Line::Text(text) => {
                let msg = MutableMessage::new(message_type, vchannel, Bytes::from(text.clone()));
                match producer.send(msg).await {
                    Ok(fut) => (text, Outcome::Pending(Box::pin(fut))),
                    Err(e) => (text, Outcome::Refused(e)),
                }
            }
            Line::TooLong(size) => (
                String::new(),
                Outcome::Refused(ClientError::TooLarge { size, limit }),
            ),
            Line::NotUtf8 => (
                String::new(),
                Outcome::Refused(ClientError::InvalidArgument("the line is not UTF-8".into())),
            ),
        };
        sent += 1;
        if tx.send((line_no, text, outcome)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let (failed, in_doubt, first) = printer.await.context("printer task")??;
    if let Some((detail, code)) = first {
        let message = if in_doubt == 0 {
            format!("{failed} of {sent} lines were not written (first: {detail})")
        } else {
            format!(
                "{failed} of {sent} lines were not acknowledged: {} not written, {in_doubt} in \
                 doubt (sent, they may be in the log) (first: {detail})",
                failed - in_doubt
            )
        };
        return Err(CliError { code, message }.into());
    }
    Ok(())
}

/// A produced line's fate: waiting for its acknowledgement, or refused before sending.
enum Outcome {
    Pending(std::pin::Pin<Box<dyn Future<Output = Result<AppendResult, ClientError>> + Send>>),
    Refused(ClientError),
}

/// A CLI failure with the stable code it is reported with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: ErrorCode,
    pub message: String,
}

/// One input line, or why it cannot be a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    /// Longer than the limit: the line is skipped, never held whole; its length is counted.
    TooLong(usize),
    NotUtf8,
}

/// Reads lines, holding at most `limit` bytes of one line in memory.
pub struct LineReader<R> {
    inner: tokio::io::BufReader<R>,
    limit: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, limit: usize) -> Self {
        Self {
            inner: tokio::io::BufReader::new(inner),
            limit,
        }
    }

    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = Vec::new();
        let mut len = 0usize;
        let mut any = false;
        loop {
            let chunk = self.inner.fill_buf().await?;
            if chunk.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if len + take <= self.limit {
                buf.extend_from_slice(&chunk[..take]);
            }
            len += take;
            self.inner.consume(take + usize::from(done));
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        if buf.last() == Some(&b'\r') && len <= self.limit {
            buf.pop();
            len -= 1;
        }
        if len > self.limit {
            return Ok(Some(Line::TooLong(len)));
        }
        Ok(Some(match String::from_utf8(buf) {
            Ok(s) => Line::Text(s),
            Err(_) => Line::NotUtf8,
        }))
    }
}

/// Parses `--from`: `all`, `latest`, `after:ID`, `from:ID`, `tick-gt:T`.
pub fn parse_from(s: &str) -> anyhow::Result<DeliverFrom> {
    let num = |v: &str| -> anyhow::Result<u64> {
        v.parse()
            .with_context(|| format!("--from {s:?}: {v:?} is not a number"))
    };
    Ok(match s.split_once(':') {
        None if s == "all" => DeliverFrom::All,
        None if s == "latest" => DeliverFrom::Latest,
        Some(("after", v)) => DeliverFrom::StartAfter(MessageId(num(v)?)),
        Some(("from", v)) => DeliverFrom::StartFrom(MessageId(num(v)?)),
        Some(("tick-gt", v)) => DeliverFrom::TickGt(TimeTick(num(v)?)),
        _ => bail!("--from must be all, latest, after:ID, from:ID or tick-gt:T (got {s:?})"),
    })
}

pub fn message_json(m: &ImmutableMessage) -> serde_json::Value {
    let mut doc = json!({
        "message_id": m.id.0,
        "time_tick": m.time_tick().0,
        "last_confirmed_id": m.last_confirmed().0,
        "vchannel": m.vchannel(),
        "type": type_name(m.message_type()),
    });
    if m.header.collection_id == 0 {
        doc["payload"] = String::from_utf8_lossy(&m.payload).into();
        return doc;
    }
    // Collection messages: their typed fields and a readable summary of the payload.
    let h = &m.header;
    doc["collection_id"] = h.collection_id.into();
    if !h.partition.is_empty() {
        doc["partition"] = h.partition.clone().into();
    }
    if h.segment_id != 0 {
        doc["segment_id"] = h.segment_id.into();
    }
    if h.broadcast_id != 0 {
        doc["broadcast_id"] = h.broadcast_id.into();
    }
    use prost::Message as _;
    match m.message_type() {
        MessageType::Insert | MessageType::Upsert => {
            doc["rows"] = h.rows.into();
            doc["payload_bytes"] = m.payload.len().into();
        }
        MessageType::Delete => {
            if let Ok(ids) = walden_proto::v1::DeleteIds::decode(m.payload.as_ref()) {
                doc["ids"] = if ids.str_ids.is_empty() {
                    json!(ids.int_ids)
                } else {
                    json!(ids.str_ids)
                };
            }
        }
        MessageType::Flush => {
            if let Ok(f) = walden_proto::v1::FlushInfo::decode(m.payload.as_ref()) {
                doc["segment_ids"] = json!(f.segment_ids);
                doc["reason"] = f.reason.into();
            }
        }
        MessageType::CreateCollection => {
            if let Ok(c) = walden_proto::v1::CollectionInfo::decode(m.payload.as_ref()) {
                doc["collection"] = c.name.into();
            }
        }
        _ => {}
    }
    doc
}

pub struct ConsumeArgs<'a> {
    pub conn: &'a ConnArgs,
    pub pchannel: &'a str,
    pub vchannel: Option<String>,
    pub from: DeliverFrom,
    pub limit: Option<u64>,
    pub idle_exit: Option<Duration>,
    pub show_ticks: bool,
    pub json: bool,
}

pub async fn consume(a: ConsumeArgs<'_>) -> anyhow::Result<()> {
    let client = connect(a.conn).await?;
    let mut consumer = client.consumer(
        a.pchannel,
        ConsumerOptions {
            from: a.from,
            vchannel: a.vchannel,
            ..ConsumerOptions::default()
        },
    );
    let mut out = tokio::io::stdout();
    let mut printed = 0u64;
    let mut idle_deadline = a.idle_exit.map(|d| tokio::time::Instant::now() + d);
    loop {
        if a.limit.is_some_and(|l| printed >= l) {
            break;
        }
        let next = match idle_deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => consumer.next().await,
        };
        let Some(m) = next else { break };
        let m = m?;
        let is_tick = m.message_type() == MessageType::TimeTick;
        if !is_tick && let Some(d) = a.idle_exit {
            idle_deadline = Some(tokio::time::Instant::now() + d);
        }
        if is_tick && !a.show_ticks {
            continue;
        }
        let line = if a.json {
            message_json(&m).to_string()
        } else {
            format!(
                "id={} tick={} type={} vchannel={} {}",
                m.id,
                m.time_tick(),
                type_name(m.message_type()),
                m.vchannel(),
                String::from_utf8_lossy(&m.payload)
            )
        };
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        printed += 1;
    }
    out.flush().await?;
    Ok(())
}

pub async fn status(conn: &ConnArgs, json_out: bool) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    let s = match client.status().await {
        Ok(s) => s,
        // A coordinator serves no node status: show the cluster.
        Err(ClientError::Unsupported(_)) => return cluster_status(&client, conn, json_out).await,
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if json_out {
        let pchannels: Vec<_> = s
            .pchannels
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "term": p.term,
                    "last_time_tick": p.last_time_tick,
                    "last_message_id": p.last_message_id,
                    "wal_bytes": p.wal_bytes,
                    "write_ahead_buffer_bytes": p.write_ahead_buffer_bytes,
                    "write_ahead_buffer_messages": p.write_ahead_buffer_messages,
                    "recovery_ms": p.recovery_ms,
                    "replayed_messages": p.replayed_messages,
                    "checkpoint_next_id": p.checkpoint_next_id,
                    "durable_checkpoint_id": p.durable_checkpoint_id,
                    "state": p.state,
                    "state_detail": p.state_detail,
                    "wal_storage": p.wal_storage,
                    "truncation_point": p.truncation_point,
                    "flush_lag_ms": p.flush_lag_ms,
                })
            })
            .collect();
        let doc = json!({ "node_id": s.node_id, "version": s.version, "pchannels": pchannels });
        writeln!(out, "{doc}")?;
    } else {
        writeln!(out, "node {} (walden {})", s.node_id, s.version)?;
        writeln!(
            out,
            "{:<16} {:>6} {:>20} {:>12} {:>12} {:>10} {:>10} {:<7} {:<10}",
            "PCHANNEL",
            "TERM",
            "LAST_TICK",
            "LAST_ID",
            "WAL_BYTES",
            "RECOVER_MS",
            "REPLAYED",
            "WAL",
            "STATE"
        )?;
        for p in &s.pchannels {
            writeln!(
                out,
                "{:<16} {:>6} {:>20} {:>12} {:>12} {:>10} {:>10} {:<7} {:<10}",
                p.name,
                p.term,
                p.last_time_tick,
                p.last_message_id,
                p.wal_bytes,
                p.recovery_ms,
                p.replayed_messages,
                p.wal_storage,
                p.state
            )?;
            if !p.state_detail.is_empty() {
                writeln!(out, "  {}: {}", p.name, p.state_detail)?;
            }
        }
    }
    Ok(())
}

/// The cluster as its coordinator sees it, with each pchannel's tick and size from its node.
async fn cluster_status(client: &Client, conn: &ConnArgs, json_out: bool) -> anyhow::Result<()> {
    use walden_proto::v1::AssignmentState;
    let c = client.cluster_status().await?;
    // Each node's own view of its pchannels (last tick, WAL bytes).
    let mut live: std::collections::HashMap<String, walden_proto::v1::PChannelStatus> =
        std::collections::HashMap::new();
    for n in &c.nodes {
        let Some(info) = &n.node else { continue };
        let node_conn = ConnArgs {
            addr: info.address.clone(),
            ..conn.clone()
        };
        if let Ok(nc) = connect(&node_conn).await
            && let Ok(s) = nc.status().await
        {
            for p in s.pchannels {
                live.insert(p.name.clone(), p);
            }
        }
    }
    let state_name =
        |s: i32| match AssignmentState::try_from(s).unwrap_or(AssignmentState::Unspecified) {
            AssignmentState::Unassigned => "unassigned",
            AssignmentState::Assigning => "assigning",
            AssignmentState::Assigned => "assigned",
            AssignmentState::Failed => "failed",
            AssignmentState::Unspecified => "unknown",
        };
    let mut out = std::io::stdout().lock();
    if json_out {
        let nodes: Vec<_> = c
            .nodes
            .iter()
            .filter_map(|n| {
                let i = n.node.as_ref()?;
                Some(json!({
                    "id": i.id,
                    "address": i.address,
                    "state": if i.draining { "draining" } else { "up" },
                    "pchannels": n.pchannels,
                }))
            })
            .collect();
        let pchannels: Vec<_> = c
            .pchannels
            .iter()
            .map(|p| {
                let l = live.get(&p.pchannel).filter(|l| l.term == p.term);
                json!({
                    "name": p.pchannel,
                    "term": p.term,
                    "node": p.node_id,
                    "state": state_name(p.state),
                    "detail": p.detail,
                    "last_time_tick": l.map(|l| l.last_time_tick),
                    "wal_bytes": l.map(|l| l.wal_bytes),
                    "wal_storage": l.map(|l| l.wal_storage.clone()),
                    "truncation_point": l.map(|l| l.truncation_point),
                    "flush_lag_ms": l.map(|l| l.flush_lag_ms),
                })
            })
            .collect();
        let doc = json!({
            "coordinator": {
                "leader": c.leader.as_ref().map(|l| l.address.clone()),
                "epoch": c.leader.as_ref().map(|l| l.epoch),
                "answered_by": c.answered_by,
            },
            "nodes": nodes,
            "pchannels": pchannels,
        });
        writeln!(out, "{doc}")?;
        return Ok(());
    }
    match &c.leader {
        Some(l) => writeln!(out, "coordinator leader {} (epoch {})", l.address, l.epoch)?,
        None => writeln!(out, "coordinator: no leader elected")?,
    }
    writeln!(
        out,
        "{:<6} {:<28} {:<9} PCHANNELS",
        "NODE", "ADDRESS", "STATE"
    )?;
    for n in &c.nodes {
        let Some(i) = &n.node else { continue };
        let state = if i.draining { "draining" } else { "up" };
        writeln!(
            out,
            "{:<6} {:<28} {:<9} {}",
            i.id,
            i.address,
            state,
            n.pchannels.join(",")
        )?;
    }
    writeln!(
        out,
        "{:<16} {:>6} {:>6} {:<10} {:>20} {:>12}",
        "PCHANNEL", "TERM", "NODE", "STATE", "LAST_TICK", "WAL_BYTES"
    )?;
    for p in &c.pchannels {
        let l = live.get(&p.pchannel).filter(|l| l.term == p.term);
        writeln!(
            out,
            "{:<16} {:>6} {:>6} {:<10} {:>20} {:>12}",
            p.pchannel,
            p.term,
            p.node_id,
            state_name(p.state),
            l.map_or_else(|| "-".into(), |l| l.last_time_tick.to_string()),
            l.map_or_else(|| "-".into(), |l| l.wal_bytes.to_string()),
        )?;
        if !p.detail.is_empty() {
            writeln!(out, "  {}: {}", p.pchannel, p.detail)?;
        }
    }
    Ok(())
}

/// `walden balance move`: an operator's move of one pchannel.
pub async fn move_pchannel(conn: &ConnArgs, pchannel: &str, to: u64) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    let detail = client.move_pchannel(pchannel, to).await?;
    println!("{detail}");
    Ok(())
}

/// `walden node drain`: moves every pchannel off a node.
pub async fn drain_node(conn: &ConnArgs, id: u64) -> anyhow::Result<()> {
    let client = connect(conn).await?;
    let detail = client.drain_node(id).await?;
    println!("{detail}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{Line, LineReader};

    #[tokio::test]
    async fn a_line_past_the_limit_is_skipped_whole_and_the_next_line_is_intact() {
        let mut input = b"ok\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 << 20));
        input.extend_from_slice(b"\nafter\n\xff\nlast");
        let mut r = LineReader::new(&input[..], 1 << 20);
        assert_eq!(r.next_line().await.unwrap(), Some(Line::Text("ok".into())));
        assert_eq!(r.next_line().await.unwrap(), Some(Line::TooLong(3 << 20)));
        assert_eq!(
            r.next_line().await.unwrap(),
            Some(Line::Text("after".into()))
        );
        assert_eq!(r.next_line().await.unwrap(), Some(Line::NotUtf8));
        assert_eq!(
            r.next_line().await.unwrap(),
            Some(Line::Text("last".into()))
        );
        assert_eq!(r.next_line().await.unwrap(), None);
    }
}
