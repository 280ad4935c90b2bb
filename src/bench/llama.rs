//! A minimal client of llama.cpp's `llama-server`, for `pagoda bench --llama-server-url`:
//! its native streaming endpoint `POST /completion` (server-sent events), over plain HTTP/1.1
//! with hyper, one connection per request.
//!
//! What llama-server sends (checked against the llama.cpp that llama-cpp-python 0.3.16
//! vendors, `tools/server/server.cpp`): one `data: {json}` event per generated token, with
//! `"tokens": [id]`, `"content"` (text, possibly empty while a UTF-8 sequence is incomplete)
//! and `"tokens_predicted"`, the number of tokens generated so far; then a last event with
//! `"stop": true`, `"tokens_evaluated"` (prompt tokens) and `"timings"`. A token whose text
//! ends in an incomplete UTF-8 sequence gets no event of its own, so tokens are counted
//! from the growth of `tokens_predicted`, not from the events. Failures arrive as
//! `error: {json}`, or as a non-200 status before the stream starts.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("invalid llama-server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("connecting to llama-server at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to llama-server: {0}")]
    Http(String),
    #[error("llama-server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("llama-server reported an error: {0}")]
    Server(String),
    #[error("unreadable event from llama-server: {0}")]
    Protocol(String),
    #[error("llama-server closed the stream before the last event")]
    Truncated,
}

/// A llama-server to drive, from a URL `http://HOST:PORT[/PREFIX]`.
#[derive(Debug, Clone)]
pub struct LlamaServer {
    host: String,
    port: u16,
    prefix: String,
    url: String,
}

impl LlamaServer {
    pub fn new(url: &str) -> Result<Self, LlamaError> {
        let bad = |reason: &str| LlamaError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let parse_port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unterminated [IPv6] host"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, parse_port(p)?),
                None if after.is_empty() => (h, 80),
                None => return Err(bad("junk after the [IPv6] host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, parse_port(p)?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            url: url.trim_end_matches('/').to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, LlamaError> {
        let addr = format!("{}:{}", self.host, self.port);
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| LlamaError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| LlamaError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, LlamaError> {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "text/event-stream, application/json")
            .body(Full::new(body))
            .map_err(|e| LlamaError::Http(e.to_string()))
    }

    /// `GET /health`: Ok when the server answers 200 (the model is loaded).
    pub async fn health(&self) -> Result<(), LlamaError> {
        let mut sender = self.connect().await?;
        let resp = sender
            .send_request(self.request("GET", "/health", Bytes::new())?)
            .await
            .map_err(|e| LlamaError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| LlamaError::Http(e.to_string()))?
            .to_bytes();
        if status != 200 {
            return Err(LlamaError::Status {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(())
    }

    /// Streams one completion: `on_tokens(n)` is called as soon as an event brings `n` new
    /// tokens. Returns the prompt's length in tokens as the server counted it.
    pub async fn completion(
        &self,
        body: &Value,
        mut on_tokens: impl FnMut(usize),
    ) -> Result<Option<usize>, LlamaError> {
        let mut sender = self.connect().await?;
        let bytes =
            Bytes::from(serde_json::to_vec(body).map_err(|e| LlamaError::Protocol(e.to_string()))?);
        let resp = sender
            .send_request(self.request("POST", "/completion", bytes)?)
            .await
            .map_err(|e| LlamaError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status != 200 {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(LlamaError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        let mut parser = SseParser::default();
        let mut tracker = CompletionTracker::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| LlamaError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for ev in parser.push(&data) {
                let step = tracker.on_event(&ev)?;
                on_tokens(step.new_tokens);
                if step.done {
                    return Ok(tracker.prompt_tokens);
                }
            }
        }
        if let Some(ev) = parser.finish() {
            let step = tracker.on_event(&ev)?;
            on_tokens(step.new_tokens);
            if step.done {
                return Ok(tracker.prompt_tokens);
            }
        }
        Err(LlamaError::Truncated)
    }
}

/// The body of a `/completion` request for the benchmark: greedy, `n_predict` tokens,
/// streamed. `prompt` is an array of token ids or a string.
pub fn completion_body(
    prompt: Value,
    n_predict: usize,
    ignore_eos: bool,
    cache_prompt: bool,
    temperature: f32,
) -> Value {
    serde_json::json!({
        "prompt": prompt,
        "n_predict": n_predict,
        "stream": true,
        "ignore_eos": ignore_eos,
        "temperature": temperature,
        "cache_prompt": cache_prompt,
        "n_probs": 0,
    })
}

/// One server-sent event: its type (`message` unless an `event:` line says otherwise;
/// llama-server's nonstandard `error: …` line makes it `error`) and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Splits a byte stream into server-sent events (blank-line separated; `\n` or `\r\n`).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Adds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end + sep).collect();
            if let Some(ev) = parse_block(&block[..end]) {
                events.push(ev);
            }
        }
        events
    }

    /// The last event, when the stream ended without its blank line.
    pub fn finish(self) -> Option<SseEvent> {
        parse_block(&self.buf)
    }
}

/// Position and length of the first blank-line separator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn parse_block(block: &[u8]) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(block);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "event" => event = Some(value.to_string()),
            "id" | "retry" => {}
            other => {
                // llama-server writes `error: {json}` for a failure mid-stream.
                event = Some(other.to_string());
                data = Some(value.to_string());
            }
        }
    }
    let data = data?;
    Some(SseEvent {
        event: event.unwrap_or_else(|| "message".into()),
        data,
    })
}

/// What one event of a completion stream means for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step {
    pub new_tokens: usize,
    pub done: bool,
}

/// Follows a `/completion` stream: tokens so far, the prompt's length, the end.
#[derive(Debug, Default)]
pub struct CompletionTracker {
    pub tokens: usize,
    pub prompt_tokens: Option<usize>,
}

impl CompletionTracker {
    pub fn on_event(&mut self, ev: &SseEvent) -> Result<Step, LlamaError> {
        let data = ev.data.trim();
        if ev.event == "error" {
            return Err(LlamaError::Server(error_message(data)));
        }
        if data == "[DONE]" {
            return Ok(Step {
                new_tokens: 0,
                done: true,
            });
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| LlamaError::Protocol(format!("{e}: {}", truncate(data, 200))))?;
        if v.get("error").is_some() {
            return Err(LlamaError::Server(error_message(data)));
        }
        let before = self.tokens;
        if let Some(n) = v.get("tokens_predicted").and_then(Value::as_u64) {
            self.tokens = self.tokens.max(n as usize);
        } else if let Some(toks) = v.get("tokens").and_then(Value::as_array) {
            self.tokens += toks.len();
        } else if v
            .get("content")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty())
        {
            self.tokens += 1;
        }
        if let Some(n) = v.get("tokens_evaluated").and_then(Value::as_u64) {
            self.prompt_tokens = Some(n as usize);
        }
        Ok(Step {
            new_tokens: self.tokens - before,
            done: v.get("stop").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

fn error_message(data: &str) -> String {
    match serde_json::from_str::<Value>(data) {
        Ok(v) => {
            let e = v.get("error").unwrap_or(&v);
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| truncate(data, 300))
        }
        Err(_) => truncate(data, 300),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let s = LlamaServer::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let s = LlamaServer::new("http://localhost:9000/llama/").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.prefix.as_str()),
            ("localhost", 9000, "/llama")
        );
        assert_eq!(s.url(), "http://localhost:9000/llama");
        let s = LlamaServer::new("http://example").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("example", 80));
        let s = LlamaServer::new("http://[::1]:8081").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("::1", 8081));
        for bad in [
            "https://x:1",
            "127.0.0.1:8080",
            "http://:80",
            "http://h:port",
        ] {
            let e = LlamaServer::new(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn sse_events_split_across_chunks() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":\r\n\r\nerror: {\"error\":{\"message\":\"boom\"}}\n\n: comment\n\ndata: x\ndata: y\n\ndata: tail";
        // Feed byte by byte: boundaries anywhere must not matter.
        let mut p = SseParser::default();
        let mut evs = Vec::new();
        for b in stream.iter() {
            evs.extend(p.push(std::slice::from_ref(b)));
        }
        let last = p.finish();
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    event: "message".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: "message".into(),
                    data: "{\"b\":".into()
                },
                SseEvent {
                    event: "error".into(),
                    data: "{\"error\":{\"message\":\"boom\"}}".into()
                },
                SseEvent {
                    event: "message".into(),
                    data: "x\ny".into()
                },
            ]
        );
        assert_eq!(
            last,
            Some(SseEvent {
                event: "message".into(),
                data: "tail".into()
            })
        );
        // All at once gives the same.
        let mut p = SseParser::default();
        assert_eq!(p.push(stream), evs);
    }

    fn ev(data: &str) -> SseEvent {
        SseEvent {
            event: "message".into(),
            data: data.into(),
        }
    }

    #[test]
    fn completion_stream_counts_tokens_from_tokens_predicted() {
        // The shape llama-server sends: one partial per token (a token with an incomplete
        // UTF-8 sequence gets none: here the 3rd), then the final one with stop.
        let events = [
            r#"{"index":0,"content":"Hello","tokens":[19556],"stop":false,"id_slot":0,"tokens_predicted":1,"tokens_evaluated":16}"#,
            r#"{"index":0,"content":" wor","tokens":[905],"stop":false,"id_slot":0,"tokens_predicted":2,"tokens_evaluated":16}"#,
            r#"{"index":0,"content":"ld\u00e9","tokens":[77],"stop":false,"id_slot":0,"tokens_predicted":4,"tokens_evaluated":16}"#,
            r#"{"index":0,"content":"","tokens":[],"id_slot":0,"stop":true,"model":"m","tokens_predicted":4,"tokens_evaluated":16,"timings":{"prompt_n":16,"predicted_n":4}}"#,
        ];
        let mut t = CompletionTracker::default();
        let steps: Vec<Step> = events.iter().map(|d| t.on_event(&ev(d)).unwrap()).collect();
        assert_eq!(
            steps.iter().map(|s| s.new_tokens).collect::<Vec<_>>(),
            vec![1, 1, 2, 0]
        );
        assert_eq!(
            steps.iter().map(|s| s.done).collect::<Vec<_>>(),
            vec![false, false, false, true]
        );
        assert_eq!(t.tokens, 4);
        assert_eq!(t.prompt_tokens, Some(16));
    }

    #[test]
    fn completion_stream_without_tokens_predicted_counts_events() {
        let mut t = CompletionTracker::default();
        assert_eq!(
            t.on_event(&ev(r#"{"content":"a","tokens":[5]}"#))
                .unwrap()
                .new_tokens,
            1
        );
        assert_eq!(t.on_event(&ev(r#"{"content":"b"}"#)).unwrap().new_tokens, 1);
        let last = t.on_event(&ev("[DONE]")).unwrap();
        assert!(last.done);
        assert_eq!(t.tokens, 2);
    }

    #[test]
    fn completion_stream_errors() {
        let mut t = CompletionTracker::default();
        let e = t
            .on_event(&SseEvent {
                event: "error".into(),
                data: r#"{"code":400,"message":"Prompt contains invalid tokens","type":"invalid_request_error"}"#.into(),
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("Prompt contains invalid tokens"),
            "{e}"
        );
        let e = t
            .on_event(&ev(r#"{"error":{"code":500,"message":"context full"}}"#))
            .unwrap_err();
        assert!(e.to_string().contains("context full"), "{e}");
        let e = t.on_event(&ev("{not json")).unwrap_err();
        assert!(matches!(e, LlamaError::Protocol(_)), "{e}");
    }

    #[test]
    fn request_body_fields() {
        let b = completion_body(serde_json::json!([1, 2]), 8, true, false, 0.0);
        assert_eq!(b["prompt"], serde_json::json!([1, 2]));
        assert_eq!(b["n_predict"], 8);
        assert_eq!(b["stream"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(b["cache_prompt"], false);
        assert_eq!(b["n_probs"], 0);
    }
}
