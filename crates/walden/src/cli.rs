//! The client commands: produce, consume, status.

use std::{io::Write as _, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use walden_client::{Client, ConsumerOptions, DeliverFrom, ProducerOptions};
use walden_common::{MessageId, TimeTick};
use walden_message::{ImmutableMessage, MessageType, MutableMessage, type_name};

pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(addr).await?)
}

/// One message per stdin line; prints each acknowledgement in the order sent.
pub async fn produce(
    addr: &str,
    pchannel: &str,
    vchannel: &str,
    message_type: MessageType,
    options: ProducerOptions,
    json_out: bool,
) -> anyhow::Result<()> {
    let client = connect(addr).await?;
    let in_flight = options.max_in_flight;
    let producer = client.producer(pchannel, options);
    // Results are awaited in send order by a printer task, so output follows input order.
    let (tx, mut rx) = tokio::sync::mpsc::channel(in_flight.max(1));
    let vchannel_owned = vchannel.to_owned();
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some((line, fut)) = rx.recv().await {
            let fut: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = fut;
            let r: walden_client::AppendResult = fut.await?;
            let text = if json_out {
                json!({
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
        out.flush().await?;
        anyhow::Ok(())
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        let msg = MutableMessage::new(message_type, vchannel, Bytes::from(line.clone()));
        msg.validate_from_client().map_err(anyhow::Error::msg)?;
        let fut = producer.send(msg).await?;
        if tx.send((line, Box::pin(fut) as _)).await.is_err() {
            break;
        }
    }
    drop(tx);
    printer.await.context("printer task")??;
    Ok(())
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
    pub addr: &'a str,
    pub pchannel: &'a str,
    pub vchannel: Option<String>,
    pub from: DeliverFrom,
    pub limit: Option<u64>,
    pub idle_exit: Option<Duration>,
    pub show_ticks: bool,
    pub json: bool,
}

pub async fn consume(a: ConsumeArgs<'_>) -> anyhow::Result<()> {
    let client = connect(a.addr).await?;
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

pub async fn status(addr: &str, json_out: bool) -> anyhow::Result<()> {
    let client = connect(addr).await?;
    let s = client.status().await?;
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
                })
            })
            .collect();
        let doc = json!({ "node_id": s.node_id, "version": s.version, "pchannels": pchannels });
        writeln!(out, "{doc}")?;
    } else {
        writeln!(out, "node {} (walden {})", s.node_id, s.version)?;
        writeln!(
            out,
            "{:<16} {:>6} {:>20} {:>12} {:>12} {:>10} {:>10}",
            "PCHANNEL", "TERM", "LAST_TICK", "LAST_ID", "WAL_BYTES", "RECOVER_MS", "REPLAYED"
        )?;
        for p in &s.pchannels {
            writeln!(
                out,
                "{:<16} {:>6} {:>20} {:>12} {:>12} {:>10} {:>10}",
                p.name,
                p.term,
                p.last_time_tick,
                p.last_message_id,
                p.wal_bytes,
                p.recovery_ms,
                p.replayed_messages
            )?;
        }
    }
    Ok(())
}
