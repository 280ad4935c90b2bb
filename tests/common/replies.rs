//! Raw NATS requests for the end-to-end tests: publish a request with a private inbox as its
//! reply subject, collect every reply until the final one, then keep listening a little
//! longer so that anything published after the end is seen too.
//!
//! Use it with `#[path = "common/replies.rs"] mod replies;` (needs async-nats, tokio and
//! pagoda-actors).
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;
use pagoda_actors::protocol::{decode_reply, Reply, WireFormat, WireRequest};
use tokio::time::Instant;

/// The runtime the end-to-end tests drive their clients with (two workers: the engine
/// under test runs in its own process).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Waits (up to 20 s) until a `pagoda serve` answers `$SRV.STATS.pagoda` with `n` engines
/// behind it (`engine.num_engines`: 1 for `--role all`, the engine processes a frontend
/// routes to); panics with the last answers otherwise.
pub async fn wait_engines(nats: &Client, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = service_stats(nats, "pagoda", Duration::from_millis(300)).await;
        if stats
            .values()
            .any(|d| d["engine"]["num_engines"].as_u64() == Some(n))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no pagoda with {n} engines behind it: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything one request's inbox received.
#[derive(Debug, Clone)]
pub struct Collected {
    pub id: String,
    pub replies: Vec<Reply>,
    /// Messages that could not be decoded as a reply.
    pub undecodable: usize,
    /// Replies that arrived after the final one (within the linger time).
    pub after_final: usize,
    /// When the request was published.
    pub sent_at: Instant,
    /// When the final reply arrived (None: the deadline passed first).
    pub final_at: Option<Instant>,
}

impl Collected {
    /// The final reply, if one arrived.
    pub fn last(&self) -> Option<&Reply> {
        self.replies.last().filter(|r| r.is_final())
    }

    /// The generated token ids, all chunks together.
    pub fn token_ids(&self) -> Vec<u32> {
        self.replies
            .iter()
            .flat_map(|r| match r {
                Reply::Chunk(c) => c.token_ids.clone(),
                Reply::Error(_) => Vec::new(),
            })
            .collect()
    }

    pub fn text(&self) -> String {
        self.replies
            .iter()
            .map(|r| match r {
                Reply::Chunk(c) => c.text.as_str(),
                Reply::Error(_) => "",
            })
            .collect()
    }

    /// The invariant of every stream: seq 0, 1, 2, … without gaps, exactly one final reply,
    /// last, nothing after it, nothing undecodable. Returns what is wrong, if anything.
    pub fn check_one_final(&self) -> Result<(), String> {
        let n = self.replies.len();
        let finals = self.replies.iter().filter(|r| r.is_final()).count();
        if finals != 1 {
            return Err(format!(
                "{}: {finals} final replies among {n}: {:?}",
                self.id, self.replies
            ));
        }
        if !self.replies[n - 1].is_final() {
            return Err(format!("{}: the final reply is not the last", self.id));
        }
        for (i, r) in self.replies.iter().enumerate() {
            if r.seq() != i as u64 {
                return Err(format!(
                    "{}: reply {i} has seq {} (gap or reorder)",
                    self.id,
                    r.seq()
                ));
            }
        }
        if self.after_final > 0 {
            return Err(format!(
                "{}: {} replies after the final one",
                self.id, self.after_final
            ));
        }
        if self.undecodable > 0 {
            return Err(format!(
                "{}: {} undecodable replies",
                self.id, self.undecodable
            ));
        }
        Ok(())
    }
}

/// Publishes `req` (MessagePack) on `subject` with a fresh inbox as the reply subject and
/// collects the replies until the final one or `deadline`; then listens `linger` longer.
pub async fn request(
    nats: &Client,
    subject: &str,
    req: &WireRequest,
    deadline: Duration,
    linger: Duration,
) -> Collected {
    let id = req.id.clone().unwrap_or_default();
    let inbox = nats.new_inbox();
    let mut sub = nats
        .subscribe(inbox.clone())
        .await
        .expect("subscribe to an inbox");
    let body = rmp_serde::to_vec_named(req).expect("encode a request");
    let sent_at = Instant::now();
    nats.publish_with_reply(subject.to_owned(), inbox, body.into())
        .await
        .expect("publish a request");
    let mut out = Collected {
        id,
        replies: Vec::new(),
        undecodable: 0,
        after_final: 0,
        sent_at,
        final_at: None,
    };
    let end = sent_at + deadline;
    loop {
        let until = match out.final_at {
            Some(t) => t + linger,
            None => end,
        };
        let msg = match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        match decode_reply(&msg.payload, WireFormat::MsgPack) {
            Ok(r) => {
                if out.final_at.is_some() {
                    out.after_final += 1;
                    continue;
                }
                let fin = r.is_final();
                out.replies.push(r);
                if fin {
                    out.final_at = Some(Instant::now());
                }
            }
            Err(_) => out.undecodable += 1,
        }
    }
    out
}

/// The `data` of the first endpoint of `$SRV.STATS.<service>` from every instance that
/// answers within `wait`, keyed by instance id.
pub async fn service_stats(
    nats: &Client,
    service: &str,
    wait: Duration,
) -> HashMap<String, serde_json::Value> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await.expect("subscribe");
    nats.publish_with_reply(format!("$SRV.STATS.{service}"), inbox, "".into())
        .await
        .expect("publish $SRV.STATS");
    let mut out = HashMap::new();
    let end = Instant::now() + wait;
    while let Ok(Some(msg)) = tokio::time::timeout_at(end, sub.next()).await {
        let v: serde_json::Value = match serde_json::from_slice(&msg.payload) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let id = v["id"].as_str().unwrap_or("").to_owned();
        out.insert(id, v["endpoints"][0]["data"].clone());
    }
    out
}
