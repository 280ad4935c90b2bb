//! NATS authorization as pagoda's security model (`configs/nats/pagoda.conf`,
//! `docs/security.md`): a real nats-server with that configuration, a `pagoda serve` as
//! the `engine` user, a backend as the `client` user with its own inbox prefix.
//!
//! The backend is served (core and durable), and the server refuses it everything else:
//! publishing advisories, dead letters, internal traffic or JetStream API calls, and
//! reading the requests or another client's replies. No credential reaches the logs.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/process.rs"]
mod serve_process;

use std::path::Path;
use std::time::Duration;

use nats_server::NatsServer;
use pagoda::client::Client;
use pagoda::config::NatsConfig;
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::WireRequest;
use serve_process::Serve;
use tokio::sync::mpsc;

const ENGINE_PASSWORD: &str = "engine-pw-Zq81";
const CLIENT_PASSWORD: &str = "client-pw-Xk27";
const ADMIN_PASSWORD: &str = "admin-pw-Lm55";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A nats-server with pagoda's authorization configuration; the passwords are in its
/// environment, as the configuration expects.
fn server() -> NatsServer {
    // The configuration reads the passwords from nats-server's environment, inherited
    // from this process; every test of this file sets the same values.
    std::env::set_var("PAGODA_ENGINE_PASSWORD", ENGINE_PASSWORD);
    std::env::set_var("PAGODA_CLIENT_PASSWORD", CLIENT_PASSWORD);
    std::env::set_var("PAGODA_ADMIN_PASSWORD", ADMIN_PASSWORD);
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/nats/pagoda.conf");
    NatsServer::start_with_args(&["-c", conf.to_str().expect("utf-8 path")])
}

fn url_with(user: &str, password: &str, port: u16) -> String {
    format!("nats://{user}:{password}@127.0.0.1:{port}")
}

/// A connection whose server errors (permission violations) arrive on the receiver.
async fn connect_watched(
    url: &str,
    user: &str,
    password: &str,
    inbox_prefix: Option<&str>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut opts = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |ev| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = ev {
                    // The test reads what it needs; a closed receiver means it is done.
                    if tx.send(e.to_string()).is_err() {
                        eprintln!("server error after the test ended: {e}");
                    }
                }
            }
        });
    if let Some(p) = inbox_prefix {
        opts = opts.custom_inbox_prefix(p);
    }
    let c = opts.connect(url).await.expect("connect");
    (c, rx)
}

/// Waits for a permission violation mentioning `subject`.
async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("no permission violation for {subject}"))
            .expect("error channel");
        if e.to_lowercase().contains("permissions violation") && e.contains(subject) {
            return;
        }
    }
}

#[test]
fn clients_are_served_and_refused_everything_else() {
    let nats = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut engine = Serve::spawn(
        "engine",
        &nats.url(),
        dir.path(),
        &["--intake", "jetstream"],
        &[
            ("PAGODA_NATS__USER", "engine"),
            ("PAGODA_NATS__PASSWORD", ENGINE_PASSWORD),
        ],
    );
    engine.wait_for_log("pulling jobs");
    let rt = runtime();
    rt.block_on(async {
        // Served: core request/reply and a durable job, replies on the client's own inbox.
        let cfg = NatsConfig {
            url: nats.url(),
            user: Some("client".into()),
            password: Some(CLIENT_PASSWORD.into()),
            inbox_prefix: Some("_INBOX.client".into()),
            ..NatsConfig::default()
        };
        let client = Client::connect_with(&cfg)
            .await
            .expect("the client connects")
            .with_idle_timeout(Duration::from_secs(30));
        let mut req = WireRequest::text("The capital of France is");
        req.params.temperature = 0.0;
        req.params.max_tokens = 8;
        let done = client
            .generate(req.clone())
            .await
            .expect("generate")
            .collect_text()
            .await
            .expect("answered");
        assert_eq!(done.finish_reason, FinishReason::Length);
        req.id = Some("durable-1".into());
        let done = client
            .generate_durable(req.clone())
            .await
            .expect("publish a job")
            .collect_text()
            .await
            .expect("job answered");
        assert_eq!(done.token_ids.len(), 8);

        // Refused: everything a client has no business doing.
        let (raw, mut errors) = connect_watched(
            &nats.url(),
            "client",
            CLIENT_PASSWORD,
            Some("_INBOX.client"),
        )
        .await;
        let (admin, _) = connect_watched(&nats.url(), "admin", ADMIN_PASSWORD, None).await;
        let mut dead = admin
            .subscribe("pagoda.v1.dead")
            .await
            .expect("admin subscribes");
        let mut purge = admin
            .subscribe("$JS.API.STREAM.PURGE.>")
            .await
            .expect("admin subscribes");
        admin.flush().await.expect("flush");
        for subject in [
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.PAGODA_JOBS.pagoda",
            "pagoda.v1.dead",
            "pagoda.v1.internal.engine.x",
            "$JS.API.STREAM.PURGE.PAGODA_JOBS",
            "_INBOX.other.reply",
        ] {
            raw.publish(subject, "{}".into())
                .await
                .expect("publish is sent");
            raw.flush().await.expect("flush");
            expect_violation(&mut errors, subject).await;
        }
        for subject in [
            "_INBOX.other.>",
            "_INBOX.>",
            "pagoda.v1.generate",
            "pagoda.v1.>",
        ] {
            let _sub = raw
                .subscribe(subject.to_string())
                .await
                .expect("subscribe is sent");
            raw.flush().await.expect("flush");
            expect_violation(&mut errors, subject).await;
        }
        // Nothing got through to the dead letters or the stream API.
        for s in [&mut dead, &mut purge] {
            assert!(
                tokio::time::timeout(Duration::from_millis(300), futures_util::StreamExt::next(s))
                    .await
                    .is_err(),
                "a refused publish got through"
            );
        }
        // A wrong password is refused outright.
        let bad = async_nats::ConnectOptions::with_user_and_password(
            "client".into(),
            "not-the-password".into(),
        )
        .connect(nats.url())
        .await;
        assert!(bad.is_err(), "a wrong password must not connect");
    });
    engine.assert_alive();
    let log = engine.log();
    assert!(
        !log.contains(ENGINE_PASSWORD),
        "the engine logged its password:\n{log}"
    );
}

#[test]
fn credentials_in_the_url_never_reach_the_logs() {
    let nats = server();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = url_with("engine", ENGINE_PASSWORD, nats.port());
    let mut engine = Serve::spawn("engine", &url, dir.path(), &[], &[]);
    engine.wait_for_log("serving");
    engine.kill();
    let log = engine.log();
    assert!(
        log.contains("***@127.0.0.1"),
        "the URL is shown redacted:\n{log}"
    );
    assert!(
        !log.contains(ENGINE_PASSWORD),
        "the password leaked:\n{log}"
    );
    // An error names the server without the credentials either.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args([
            "request",
            "--nats-url",
            &url_with("client", "wrong-secret-Qq9", nats.port()),
            "hello",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run pagoda request");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a wrong password must fail: {text}");
    assert!(
        !text.contains("wrong-secret-Qq9"),
        "the password leaked:\n{text}"
    );
}
