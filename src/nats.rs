//! NATS connections from the `[nats]` configuration: server list, authentication, TLS,
//! reconnect backoff, and connection events in the log. Shared by `pagoda serve` and the
//! client side (`pagoda request`, [`crate::client::Client`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};

use crate::config::NatsConfig;

/// A connection that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid NATS server URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot read the credentials file {path}")]
    Creds {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {urls}")]
    Connect {
        urls: String,
        source: async_nats::ConnectError,
    },
}

/// Whether a failed first connection is retried in the background (the server process
/// wants that) or reported at once (a command-line client does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialConnect {
    /// Follow `nats.retry_on_initial_connect`.
    FromConfig,
    /// Fail when no server answers now.
    FailFast,
}

/// `url` without credentials, for logs and errors: `nats://user:secret@host:4222` →
/// `nats://***@host:4222` (a token URL `nats://tok@host` alike). Several URLs separated
/// by commas are each redacted.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let (scheme, rest) = match u.find("://") {
                Some(i) => (&u[..i + 3], &u[i + 3..]),
                None => ("", u),
            };
            let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
                None => u.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The reconnect delay before attempt `attempts` (1-based): 0 first, then doubling from
/// 2 ms up to `max`.
pub fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(32);
    Duration::from_millis(2u64.saturating_pow(exp)).min(max)
}

/// Connects with every option of `cfg`. Connection events (disconnect, reconnect, slow
/// consumer, server errors) are logged through `tracing`.
pub async fn connect(
    cfg: &NatsConfig,
    initial: InitialConnect,
) -> Result<async_nats::Client, ConnectError> {
    let mut addrs = Vec::new();
    for url in cfg.urls() {
        let addr = url.parse::<ServerAddr>().map_err(|e| ConnectError::Url {
            url: redact_url(&url),
            // The parser's message may quote the URL: never show credentials.
            message: e.to_string().replace(url.as_str(), &redact_url(&url)),
        })?;
        addrs.push(addr);
    }
    let mut opts = ConnectOptions::new()
        .name(&cfg.name)
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms.max(1)))
        .max_reconnects(None)
        .require_tls(cfg.tls_required);
    let max_delay = Duration::from_millis(cfg.max_reconnect_delay_ms);
    opts = opts.reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay));
    if initial == InitialConnect::FromConfig && cfg.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(prefix) = &cfg.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix.clone());
    }
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let Some(seed) = &cfg.nkey_seed {
        opts = opts.nkey(seed.clone());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Creds {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let name = cfg.name.clone();
    opts = opts.event_callback(move |event| {
        let name = name.clone();
        async move { log_event(&name, &event) }
    });
    let urls = redact_url(&cfg.urls().join(","));
    opts.connect(addrs)
        .await
        .map_err(|source| ConnectError::Connect { urls, source })
}

/// Connections of this process lost since it started (every connection made by
/// [`connect`] counts). Messages written just before a loss may never have reached the
/// server, so work that depends on every reply arriving (a durable job) compares this
/// count before and after.
pub fn disconnects() -> u64 {
    DISCONNECTS.load(Ordering::Relaxed)
}

static DISCONNECTS: AtomicU64 = AtomicU64::new(0);

fn log_event(name: &str, event: &Event) {
    match event {
        Event::Connected => tracing::info!(connection = name, "NATS connected"),
        Event::Disconnected => {
            DISCONNECTS.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                connection = name,
                "NATS connection lost; reconnecting (replies are buffered meanwhile)"
            )
        }
        Event::LameDuckMode => tracing::warn!(
            connection = name,
            "NATS server entered lame duck mode; it will close this connection soon"
        ),
        Event::Draining => tracing::info!(connection = name, "NATS connection draining"),
        Event::Closed => tracing::info!(connection = name, "NATS connection closed"),
        Event::SlowConsumer(sid) => tracing::warn!(
            connection = name,
            sid,
            "NATS slow consumer: messages dropped for a subscription"
        ),
        Event::ServerError(e) => {
            tracing::error!(connection = name, error = %e, "NATS server error")
        }
        // Failed reconnect attempts land here too: the Disconnected warning already said it.
        Event::ClientError(e) => {
            tracing::debug!(connection = name, error = %e, "NATS client error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_millis(4000);
        assert_eq!(reconnect_delay(0, max), Duration::ZERO);
        assert_eq!(reconnect_delay(1, max), Duration::ZERO);
        assert_eq!(reconnect_delay(2, max), Duration::from_millis(2));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(4));
        assert_eq!(reconnect_delay(12, max), Duration::from_millis(2048));
        assert_eq!(reconnect_delay(13, max), max);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact_url("nats://pagoda:s3cret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redact_url("tls://token@h"), "tls://***@h");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("nats://a:b@n1:4222,nats://n2:4222,c:d@n3"),
            "nats://***@n1:4222,nats://n2:4222,***@n3"
        );
        assert!(!redact_url("nats://u:p@w@h:1").contains('p'));
    }
}
