//! Self-test of the nats-server harness (tests/common/nats.rs), with raw TCP clients only,
//! so it proves the harness independently of pagoda's gateway.

#[path = "common/nats.rs"]
mod nats;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nats::{free_port, read_info, NatsServer};

const T: Duration = Duration::from_secs(5);

/// A minimal NATS protocol client: enough for one request/reply.
struct RawClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawClient {
    fn connect(server: &NatsServer) -> (RawClient, String) {
        let stream = TcpStream::connect_timeout(&server.addr(), T).expect("connect");
        stream.set_read_timeout(Some(T)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut client = RawClient {
            reader: BufReader::new(stream),
            writer,
        };
        let info = client.line();
        assert!(
            info.starts_with("INFO {"),
            "first line is not INFO: {info:?}"
        );
        client.send("CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\nPING\r\n");
        assert_eq!(client.line(), "PONG");
        (client, info)
    }

    fn send(&mut self, s: &str) {
        self.writer.write_all(s.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("read a protocol line");
        line.trim_end().to_string()
    }

    /// Publishes `payload` to `subject` with a reply inbox and returns the reply's payload.
    fn request(&mut self, subject: &str, payload: &str) -> String {
        self.send("SUB _INBOX.harness 1\r\n");
        self.send(&format!(
            "PUB {subject} _INBOX.harness {}\r\n{payload}\r\n",
            payload.len()
        ));
        // The reply may come before or after anything else the server sends (PING, PONG).
        let header = loop {
            let line = self.line();
            match line.as_str() {
                "PING" => self.send("PONG\r\n"),
                "PONG" => {}
                _ => break line,
            }
        };
        assert!(
            header.starts_with("MSG _INBOX.harness 1 "),
            "unexpected: {header:?}"
        );
        let len: usize = header.rsplit(' ').next().unwrap().parse().unwrap();
        let mut body = vec![0u8; len + 2];
        self.reader.read_exact(&mut body).unwrap();
        self.send("UNSUB 1\r\n");
        String::from_utf8(body[..len].to_vec()).unwrap()
    }
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free_port gave a port in use");
}

#[test]
fn starts_with_jetstream_restarts_on_the_same_port_and_keeps_the_store() {
    let mut server = NatsServer::start();
    let port = server.port();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
    assert!(server.is_running());

    // A raw socket reads the INFO line.
    let info = read_info(server.addr(), T).expect("INFO from the started server");
    assert!(info.contains(&format!("\"port\":{port}")), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");

    // Create a JetStream stream over the raw protocol; it must survive the restart.
    let (mut client, _) = RawClient::connect(&server);
    let created = client.request(
        "$JS.API.STREAM.CREATE.HARNESS",
        r#"{"name":"HARNESS","subjects":["harness.>"],"storage":"file"}"#,
    );
    assert!(
        created.contains("\"type\":\"io.nats.jetstream.api.v1.stream_create_response\""),
        "{created}"
    );
    assert!(!created.contains("\"error\""), "{created}");
    let pid_before = server.pid();

    server.restart();
    assert_eq!(server.port(), port, "restart must keep the port");
    assert_ne!(server.pid(), pid_before, "restart must start a new process");
    // The old connection is gone: reading hits EOF or an error.
    let mut buf = String::new();
    let n = client.reader.read_line(&mut buf).unwrap_or(0);
    assert!(
        n == 0 || buf.starts_with("-ERR"),
        "old connection still alive: {buf:?}"
    );

    let info = read_info(server.addr(), T).expect("INFO after restart");
    assert!(info.contains(&format!("\"port\":{port}")), "{info}");
    let (mut client, _) = RawClient::connect(&server);
    let stream_info = client.request("$JS.API.STREAM.INFO.HARNESS", "");
    assert!(
        stream_info.contains("\"name\":\"HARNESS\""),
        "stream lost across restart: {stream_info}"
    );
    assert!(!stream_info.contains("\"error\""), "{stream_info}");

    // stop() really stops; drop cleans the store.
    server.stop();
    assert!(!server.is_running());
    assert!(
        read_info(server.addr(), Duration::from_millis(300)).is_err(),
        "still listening after stop"
    );
    server.start_again();
    read_info(server.addr(), T).expect("INFO after start_again");
    let store = server.store_dir();
    assert!(
        store.join("jetstream").is_dir(),
        "no jetstream dir in {}",
        store.display()
    );
    drop(server);
    assert!(!store.exists(), "store dir left behind after drop");
    assert!(read_info(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300)
    )
    .is_err());
}

#[test]
fn servers_in_parallel_get_their_own_ports() {
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "max_payload: 2MB\n").unwrap();
    let a = NatsServer::start();
    let b = NatsServer::start_with_args(&["-c", conf.path().to_str().unwrap()]);
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
    let info = read_info(b.addr(), T).unwrap();
    assert!(info.contains("\"max_payload\":2097152"), "{info}");
}
