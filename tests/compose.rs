//! Structure of the local stack (docker-compose.yml, Dockerfile, configs/prometheus.yml,
//! configs/grafana/**). Docker does not run where the tests run, so this checks what can be
//! checked without it: the four services with their images or build, ports, volumes,
//! command flags and dependencies; that every file the stack references exists in the
//! repository; that Prometheus scrapes pagoda; and that every dashboard panel queries one
//! of pagoda's metrics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no `services` map");
    services
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn str_of<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: `{key}` is missing or not a string"))
}

/// A list of strings (`command`, `depends_on` list form) or a string split on whitespace.
fn words(v: Option<&Value>, what: &str) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Sequence(seq)) => seq
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("{what}: unexpected entry {other:?}"),
            })
            .collect(),
        // depends_on long form: { nats: { condition: ... } }
        Some(Value::Mapping(m)) => m
            .keys()
            .map(|k| k.as_str().expect("string key").to_owned())
            .collect(),
        None => Vec::new(),
        other => panic!("{what}: unexpected value {other:?}"),
    }
}

/// (host port, container port) pairs of a service's `ports`, short or long syntax.
fn ports(svc: &Value, name: &str) -> Vec<(u16, u16)> {
    let Some(seq) = svc.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    seq.iter()
        .map(|p| match p {
            Value::String(s) => {
                // [IP:]HOST:CONTAINER[/proto]
                let s = s.split('/').next().unwrap();
                let parts: Vec<&str> = s.rsplitn(3, ':').collect();
                assert!(
                    parts.len() >= 2,
                    "service {name}: port {s:?} publishes no host port"
                );
                (
                    parts[1]
                        .parse()
                        .unwrap_or_else(|_| panic!("{name}: bad port {s:?}")),
                    parts[0]
                        .parse()
                        .unwrap_or_else(|_| panic!("{name}: bad port {s:?}")),
                )
            }
            Value::Mapping(_) => {
                let n = |k: &str| -> u16 {
                    match p.get(k) {
                        Some(Value::Number(n)) => n.as_u64().unwrap() as u16,
                        Some(Value::String(s)) => s.parse().unwrap(),
                        _ => panic!("service {name}: port {p:?} has no `{k}`"),
                    }
                };
                (n("published"), n("target"))
            }
            other => panic!("service {name}: port {other:?} is neither a string nor a map"),
        })
        .collect()
}

fn assert_port(compose: &Value, name: &str, port: u16) {
    let ps = ports(service(compose, name), name);
    assert!(
        ps.contains(&(port, port)),
        "service {name} does not publish {port}:{port} (ports: {ps:?})"
    );
}

/// A volume entry: (source, target). Short syntax `SRC:DST[:MODE]` or long syntax.
fn volumes(svc: &Value) -> Vec<(String, String)> {
    let Some(seq) = svc.get("volumes").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    seq.iter()
        .map(|v| match v {
            Value::String(s) => {
                let mut it = s.splitn(3, ':');
                let src = it.next().unwrap().to_owned();
                let dst = it
                    .next()
                    .unwrap_or_else(|| panic!("volume {s:?} has no container path"))
                    .to_owned();
                (src, dst)
            }
            Value::Mapping(_) => (
                str_of(v, "source", "volume").to_owned(),
                str_of(v, "target", "volume").to_owned(),
            ),
            other => panic!("unexpected volume entry {other:?}"),
        })
        .collect()
}

fn is_bind(src: &str) -> bool {
    src.starts_with("./") || src.starts_with("../") || src.starts_with('/') || src == "."
}

/// The host source mounted at `target` in service `name`.
fn mount_source(compose: &Value, name: &str, target: &str) -> String {
    let vols = volumes(service(compose, name));
    vols.iter()
        .find(|(_, dst)| dst == target)
        .map(|(src, _)| src.clone())
        .unwrap_or_else(|| panic!("service {name} mounts nothing at {target} (volumes: {vols:?})"))
}

fn image(compose: &Value, name: &str) -> String {
    str_of(service(compose, name), "image", &format!("service {name}")).to_owned()
}

/// `repository` of an image reference `repository[:tag]`.
fn image_repo(image: &str) -> &str {
    image.split(':').next().unwrap()
}

#[test]
fn the_four_services_exist() {
    let c = compose();
    let names: BTreeSet<&str> = c["services"]
        .as_mapping()
        .expect("services map")
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for want in ["nats", "pagoda", "prometheus", "grafana"] {
        assert!(names.contains(want), "no service {want} in {names:?}");
    }
}

#[test]
fn nats_is_the_official_image_with_jetstream_on_a_named_volume() {
    let c = compose();
    assert_eq!(
        image_repo(&image(&c, "nats")),
        "nats",
        "nats must use the official `nats` image"
    );
    let nats = service(&c, "nats");
    let cmd = words(nats.get("command"), "nats command");
    assert!(
        cmd.iter().any(|w| w == "-js" || w == "--jetstream"),
        "nats runs without JetStream (-js): {cmd:?}"
    );
    let sd = cmd
        .iter()
        .position(|w| w == "-sd" || w == "--store_dir")
        .and_then(|i| cmd.get(i + 1))
        .unwrap_or_else(|| panic!("nats has no JetStream store dir (-sd DIR): {cmd:?}"));
    let src = mount_source(&c, "nats", sd);
    assert!(
        !is_bind(&src),
        "the JetStream store {sd} should be a named volume, is {src}"
    );
    let declared = c
        .get("volumes")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml declares no top-level `volumes`");
    assert!(
        declared.contains_key(src.as_str()),
        "volume {src} is not declared under the top-level `volumes`"
    );
    assert!(
        cmd.iter().any(|w| w == "-m" || w == "--http_port"),
        "nats has no monitoring port (-m 8222): {cmd:?}"
    );
    assert_port(&c, "nats", 4222);
    assert_port(&c, "nats", 8222);
}

#[test]
fn pagoda_is_built_from_the_dockerfile_and_serves_on_the_stack() {
    let c = compose();
    let pagoda = service(&c, "pagoda");
    let build = pagoda.get("build").expect("service pagoda has no `build`");
    let (context, dockerfile) = match build {
        Value::String(ctx) => (ctx.clone(), "Dockerfile".to_owned()),
        _ => (
            str_of(build, "context", "pagoda build").to_owned(),
            build
                .get("dockerfile")
                .and_then(Value::as_str)
                .unwrap_or("Dockerfile")
                .to_owned(),
        ),
    };
    let ctx = repo_root().join(&context);
    assert!(
        ctx.is_dir(),
        "build context {} is not a directory",
        ctx.display()
    );
    let df = ctx.join(&dockerfile);
    assert!(df.is_file(), "Dockerfile {} does not exist", df.display());

    let cmd = words(pagoda.get("command"), "pagoda command");
    assert_eq!(
        cmd.first().map(String::as_str),
        Some("serve"),
        "pagoda command: {cmd:?}"
    );
    let flag = |name: &str| -> Option<String> {
        cmd.iter().enumerate().find_map(|(i, w)| {
            if w == name {
                cmd.get(i + 1).cloned()
            } else {
                w.strip_prefix(&format!("{name}=")).map(str::to_owned)
            }
        })
    };
    assert_eq!(
        flag("--nats-url").as_deref(),
        Some("nats://nats:4222"),
        "pagoda must reach NATS at nats://nats:4222: {cmd:?}"
    );
    let listen = flag("--metrics-listen")
        .unwrap_or_else(|| panic!("pagoda has no --metrics-listen: {cmd:?}"));
    assert!(
        listen.starts_with("0.0.0.0:") && listen.ends_with(":9464"),
        "--metrics-listen {listen} must listen on all interfaces, port 9464"
    );
    let deps = words(pagoda.get("depends_on"), "pagoda depends_on");
    assert!(
        deps.iter().any(|d| d == "nats"),
        "pagoda must depend on nats: {deps:?}"
    );
    assert_port(&c, "pagoda", 9464);

    // The healthcheck asks /health with a tool the image has.
    let hc = words(
        pagoda.get("healthcheck").and_then(|h| h.get("test")),
        "pagoda healthcheck",
    );
    assert!(
        hc.iter().any(|w| w.contains(":9464/health")),
        "pagoda's healthcheck does not hit :9464/health: {hc:?}"
    );
    let dockerfile = std::fs::read_to_string(&df).unwrap();
    let tool = hc
        .iter()
        .find(|w| *w != "CMD" && *w != "CMD-SHELL")
        .unwrap();
    assert!(
        dockerfile.contains(&format!(
            "install -y --no-install-recommends ca-certificates {tool}"
        )) || dockerfile
            .lines()
            .any(|l| l.contains("apt-get install") && l.contains(tool.as_str())),
        "the healthcheck runs {tool}, which the Dockerfile does not install"
    );
}

#[test]
fn the_dockerfile_is_multi_stage_and_copies_what_exists() {
    let df = read("Dockerfile");
    let froms: Vec<&str> = df
        .lines()
        .map(str::trim)
        .filter(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert!(
        froms.len() >= 2,
        "the Dockerfile is not multi-stage: {froms:?}"
    );
    assert!(
        froms[0].contains("rust:") && froms[0].to_ascii_lowercase().contains(" as builder"),
        "the first stage must be a rust builder: {}",
        froms[0]
    );
    assert!(
        froms.last().unwrap().contains("debian:bookworm-slim"),
        "the runtime stage must be debian:bookworm-slim: {}",
        froms.last().unwrap()
    );
    assert!(
        df.contains("cargo build --release"),
        "the builder does not run cargo build --release"
    );
    assert!(
        df.contains("scripts/fetch-model.sh") && df.contains("python3-pip") && df.contains("unzip"),
        "the builder must fetch the default model with scripts/fetch-model.sh (python3-pip, unzip)"
    );
    // Every `COPY SRC... DST` from the build context names something in the repository.
    let mut copied = 0;
    for line in df.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        if rest.contains("--from=") {
            continue;
        }
        let parts: Vec<&str> = rest
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        for src in &parts[..parts.len() - 1] {
            let path = repo_root().join(src);
            assert!(
                path.exists(),
                "the Dockerfile copies {src}, which does not exist"
            );
            assert!(
                !dockerignored(src),
                "the Dockerfile copies {src}, which .dockerignore excludes"
            );
            copied += 1;
        }
    }
    assert!(
        copied >= 4,
        "the Dockerfile copies only {copied} paths from the context"
    );
    assert!(
        df.contains("COPY --from=builder") && df.contains("configs"),
        "the runtime stage must take the binary from the builder and carry configs/"
    );
}

/// Files the crates embed at compile time (`include_bytes!` / `include_str!` in src/,
/// actors/src, kernels/src) must be in the builder stage, or `docker build` fails.
#[test]
fn the_builder_copies_every_file_the_sources_embed() {
    let df = read("Dockerfile");
    let copied: Vec<String> = df
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|rest| !rest.contains("--from="))
        .flat_map(|rest| {
            let parts: Vec<String> = rest.split_whitespace().map(String::from).collect();
            parts[..parts.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let mut embedded = Vec::new();
    for dir in ["src", "actors/src", "kernels/src"] {
        embedded_files(&repo_root().join(dir), &mut embedded);
    }
    assert!(
        !embedded.is_empty(),
        "found no include_bytes!/include_str! (parser broken?)"
    );
    for file in &embedded {
        let rel = file
            .strip_prefix(repo_root().canonicalize().unwrap())
            .unwrap_or_else(|_| panic!("{} is outside the repository", file.display()))
            .to_string_lossy()
            .into_owned();
        assert!(
            copied
                .iter()
                .any(|c| rel == *c || rel.starts_with(&format!("{}/", c.trim_end_matches('/')))),
            "the sources embed {rel}, which the Dockerfile's builder does not COPY (copied: {copied:?})"
        );
        assert!(
            !dockerignored(&rel),
            "the sources embed {rel}, which .dockerignore excludes"
        );
    }
}

/// The files named by `include_bytes!("…")` / `include_str!("…")` under `dir`, resolved
/// against the including file's directory.
fn embedded_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            embedded_files(&p, out);
        } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            for mac in ["include_bytes!(\"", "include_str!(\""] {
                for (at, _) in text.match_indices(mac) {
                    let rest = &text[at + mac.len()..];
                    let Some(end) = rest.find('"') else { continue };
                    let target = p.parent().unwrap().join(&rest[..end]);
                    let target = target.canonicalize().unwrap_or_else(|e| {
                        panic!("{} embeds {}: {e}", p.display(), target.display())
                    });
                    out.push(target);
                }
            }
        }
    }
}

/// Whether a top-level `.dockerignore` pattern excludes `rel` (plain prefixes only).
fn dockerignored(rel: &str) -> bool {
    let ignore = read(".dockerignore");
    ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.contains('*'))
        .any(|pat| {
            let pat = pat.trim_end_matches('/');
            rel == pat || rel.starts_with(&format!("{pat}/"))
        })
}

#[test]
fn every_bind_mount_exists_and_every_named_volume_is_declared() {
    let c = compose();
    let declared = c
        .get("volumes")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let mut binds = 0;
    for (name, svc) in c["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        for (src, dst) in volumes(svc) {
            if is_bind(&src) {
                let path = repo_root().join(&src);
                assert!(
                    path.exists(),
                    "service {name} mounts {src} (at {dst}), which does not exist in the repository"
                );
                binds += 1;
            } else {
                assert!(
                    declared.contains_key(src.as_str()),
                    "service {name} uses volume {src}, not declared under the top-level `volumes`"
                );
            }
        }
    }
    assert!(
        binds >= 3,
        "expected the Prometheus and Grafana config mounts, found {binds}"
    );
}

#[test]
fn prometheus_mounts_its_config_and_scrapes_pagoda() {
    let c = compose();
    assert_eq!(image_repo(&image(&c, "prometheus")), "prom/prometheus");
    assert_port(&c, "prometheus", 9090);
    let src = mount_source(&c, "prometheus", "/etc/prometheus/prometheus.yml");
    assert_eq!(src.trim_start_matches("./"), "configs/prometheus.yml");
    let cmd = words(
        service(&c, "prometheus").get("command"),
        "prometheus command",
    );
    if !cmd.is_empty() {
        assert!(
            cmd.iter()
                .any(|w| w == "--config.file=/etc/prometheus/prometheus.yml"),
            "prometheus command does not read the mounted config: {cmd:?}"
        );
    }

    let prom = yaml("configs/prometheus.yml");
    let jobs = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs list");
    let job = jobs
        .iter()
        .find(|j| {
            j["static_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|sc| {
                    sc["targets"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|t| t.as_str() == Some("pagoda:9464"))
                })
        })
        .expect("configs/prometheus.yml has no scrape target pagoda:9464");
    let interval = job
        .get("scrape_interval")
        .or_else(|| prom.get("global").and_then(|g| g.get("scrape_interval")))
        .and_then(Value::as_str);
    assert_eq!(interval, Some("5s"), "pagoda must be scraped every 5 s");
    let path = job
        .get("metrics_path")
        .and_then(Value::as_str)
        .unwrap_or("/metrics");
    assert_eq!(path, "/metrics");
}

#[test]
fn grafana_is_provisioned_with_prometheus_and_the_pagoda_dashboard() {
    let c = compose();
    assert_eq!(image_repo(&image(&c, "grafana")), "grafana/grafana");
    assert_port(&c, "grafana", 3000);
    let g = service(&c, "grafana");
    let env = g.get("environment").expect("grafana has no environment");
    let env_get = |k: &str| -> Option<String> {
        match env {
            Value::Mapping(m) => m.get(k).map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                other => format!("{other:?}"),
            }),
            Value::Sequence(s) => s
                .iter()
                .filter_map(Value::as_str)
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_owned)),
            _ => None,
        }
    };
    assert_eq!(
        env_get("GF_AUTH_ANONYMOUS_ENABLED").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_get("GF_AUTH_ANONYMOUS_ORG_ROLE").as_deref(),
        Some("Viewer")
    );

    let prov = mount_source(&c, "grafana", "/etc/grafana/provisioning");
    let prov = repo_root().join(&prov);
    assert!(prov.is_dir(), "{} is not a directory", prov.display());

    // The datasource: Prometheus at http://prometheus:9090.
    let ds_dir = prov.join("datasources");
    let ds_files = yaml_files(&ds_dir);
    assert!(
        !ds_files.is_empty(),
        "no datasource YAML in {}",
        ds_dir.display()
    );
    let mut prometheus_uid = None;
    for f in &ds_files {
        let v: Value = serde_yaml::from_str(&std::fs::read_to_string(f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for ds in v["datasources"].as_sequence().into_iter().flatten() {
            if ds["type"].as_str() == Some("prometheus") {
                assert_eq!(
                    ds["url"].as_str(),
                    Some("http://prometheus:9090"),
                    "{}",
                    f.display()
                );
                prometheus_uid = ds["uid"].as_str().map(str::to_owned);
            }
        }
    }
    let prometheus_uid = prometheus_uid.expect("no provisioned prometheus datasource with a uid");

    // The dashboard provider reads the directory where the dashboards are mounted.
    let db_dir = prov.join("dashboards");
    let db_files = yaml_files(&db_dir);
    assert!(
        !db_files.is_empty(),
        "no dashboard provider YAML in {}",
        db_dir.display()
    );
    let provider_paths: Vec<String> = db_files
        .iter()
        .flat_map(|f| {
            let v: Value = serde_yaml::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            v["providers"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| p["options"]["path"].as_str().map(str::to_owned))
        })
        .collect();
    assert!(
        !provider_paths.is_empty(),
        "no dashboard provider with options.path"
    );
    for p in &provider_paths {
        let src = mount_source(&c, "grafana", p);
        let host = repo_root().join(&src);
        assert!(
            host.join("pagoda.json").is_file(),
            "the provider path {p} is mounted from {src}, which holds no pagoda.json"
        );
    }

    // Every panel uses the provisioned datasource.
    let dash = dashboard();
    for panel in panels(&dash) {
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some(prometheus_uid.as_str()),
            "panel {:?} does not use the provisioned datasource {prometheus_uid}",
            panel["title"]
        );
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")))
        .collect();
    v.sort();
    v
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("configs/grafana/dashboards/pagoda.json"))
        .unwrap_or_else(|e| panic!("configs/grafana/dashboards/pagoda.json is not valid JSON: {e}"))
}

fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let panels = dash["panels"]
        .as_array()
        .expect("the dashboard has no `panels` array");
    assert!(!panels.is_empty(), "the dashboard has no panels");
    panels.iter().collect()
}

fn exprs(panel: &serde_json::Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["expr"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn every_dashboard_panel_queries_a_pagoda_metric() {
    let dash = dashboard();
    assert_eq!(dash["uid"].as_str(), Some("pagoda"));
    let mut ids = BTreeSet::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("<untitled>");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        let es = exprs(panel);
        assert!(!es.is_empty(), "panel {title} has no PromQL expr");
        for e in es {
            assert!(
                e.contains("vllm:") || e.contains("pagoda_"),
                "panel {title}: expr {e:?} queries no vllm: or pagoda_ metric"
            );
            let opens = e.matches('(').count();
            assert_eq!(
                opens,
                e.matches(')').count(),
                "panel {title}: unbalanced parens in {e:?}"
            );
        }
    }
}

/// The metric names each required panel queries.
const REQUIRED: &[&str] = &[
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "pagoda_nats_errors_total",
    "vllm:request_success_total",
    "vllm:spec_decode_num_accepted_tokens_total",
    "vllm:spec_decode_num_draft_tokens_total",
];

#[test]
fn the_dashboard_has_the_required_panels() {
    let dash = dashboard();
    let all: Vec<String> = panels(&dash)
        .into_iter()
        .flat_map(|p| exprs(p).into_iter().map(str::to_owned))
        .collect();
    let has = |needle: &str| all.iter().any(|e| e.contains(needle));
    for m in REQUIRED {
        assert!(has(m), "no dashboard panel queries {m}");
    }
    for (metric, q) in [
        ("vllm:time_to_first_token_seconds_bucket", "0.5"),
        ("vllm:time_to_first_token_seconds_bucket", "0.99"),
        ("vllm:inter_token_latency_seconds_bucket", "0.5"),
        ("vllm:inter_token_latency_seconds_bucket", "0.99"),
    ] {
        assert!(
            all.iter()
                .any(|e| e.contains(metric) && e.contains(&format!("histogram_quantile({q},"))),
            "no p{} panel over {metric}",
            q.trim_start_matches("0.").trim_end_matches('0')
        );
    }
    assert!(
        all.iter()
            .any(|e| e.contains("rate(vllm:prefix_cache_hits_total")
                && e.contains("rate(vllm:prefix_cache_queries_total")),
        "no prefix-cache hit-rate panel (rate of hits / rate of queries)"
    );
    assert!(
        all.iter()
            .any(|e| e.contains("pagoda_nats_errors_total") && e.contains("by (code)")),
        "no errors-by-code panel"
    );
    assert!(
        all.iter().any(|e| e.contains("vllm:request_success_total") && e.contains("by (finished_reason)")),
        "no finished-requests-by-reason panel"
    );
}

/// Every metric the dashboard queries is one pagoda exports: its name (without the
/// `_bucket` suffix of a histogram) appears in the sources of the binary or the actors.
#[test]
fn the_dashboard_queries_metrics_that_pagoda_exports() {
    let mut sources = String::new();
    for dir in ["src", "actors/src"] {
        collect_rs(&repo_root().join(dir), &mut sources);
    }
    for m in REQUIRED {
        let base = m.strip_suffix("_bucket").unwrap_or(m);
        let stem = base.strip_suffix("_total").unwrap_or(base);
        assert!(
            sources.contains(&format!("\"{base}\"")) || sources.contains(&format!("\"{stem}\"")),
            "the dashboard queries {m}, but no source file names the metric \"{base}\""
        );
    }
}

fn collect_rs(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// A service's key, looking through a YAML merge key (`<<: *anchor`) as compose does.
fn merged<'a>(svc: &'a Value, key: &str) -> Option<&'a Value> {
    svc.get(key)
        .or_else(|| svc.get("<<").and_then(|m| m.get(key)))
}

#[test]
fn nats_runs_with_pagodas_authorization_and_pagoda_logs_in() {
    let c = compose();
    let nats = service(&c, "nats");
    let cmd = words(nats.get("command"), "nats command");
    let conf = cmd
        .iter()
        .position(|w| w == "-c" || w == "--config")
        .and_then(|i| cmd.get(i + 1))
        .unwrap_or_else(|| panic!("nats runs without -c <config>: {cmd:?}"));
    let (dir, file) = conf.rsplit_once('/').expect("an absolute config path");
    let src = mount_source(&c, "nats", dir);
    let on_disk = repo_root().join(src.trim_start_matches("./")).join(file);
    assert!(
        on_disk.is_file(),
        "{} is not in the repository",
        on_disk.display()
    );
    let text = std::fs::read_to_string(&on_disk).unwrap();
    let env = nats.get("environment").expect("nats passes the passwords");
    for var in [
        "PAGODA_ENGINE_PASSWORD",
        "PAGODA_CLIENT_PASSWORD",
        "PAGODA_ADMIN_PASSWORD",
    ] {
        assert!(
            text.contains(&format!("${var}")),
            "{file} does not read {var}"
        );
        assert!(env.get(var).is_some(), "nats's environment has no {var}");
    }
    let pagoda_env = service(&c, "pagoda")
        .get("environment")
        .expect("pagoda's environment");
    assert_eq!(
        pagoda_env.get("PAGODA_NATS__USER").and_then(Value::as_str),
        Some("engine")
    );
    let pw = pagoda_env
        .get("PAGODA_NATS__PASSWORD")
        .and_then(Value::as_str)
        .expect("pagoda's NATS password");
    assert!(
        pw.contains("PAGODA_ENGINE_PASSWORD"),
        "pagoda must log in with the engine password nats reads: {pw}"
    );
}

#[test]
fn the_cluster_profile_routes_three_nodes_and_replicates_the_jobs() {
    let c = compose();
    let nodes = ["nats-1", "nats-2", "nats-3"];
    for n in nodes {
        let svc = service(&c, n);
        let profiles = words(merged(svc, "profiles"), "profiles");
        assert_eq!(profiles, ["cluster"], "{n} belongs to the cluster profile");
        let cmd = words(merged(svc, "command"), "command");
        let flag = |f: &str| {
            cmd.iter()
                .position(|w| w == f)
                .and_then(|i| cmd.get(i + 1))
                .cloned()
                .unwrap_or_else(|| panic!("{n} has no {f}: {cmd:?}"))
        };
        assert!(cmd.iter().any(|w| w == "-js"), "{n} without JetStream");
        assert_eq!(flag("--name"), n);
        assert_eq!(flag("--cluster_name"), "pagoda");
        let routes = flag("--routes");
        for other in nodes {
            assert!(
                routes.contains(&format!("nats://{other}:6222")),
                "{n} does not route to {other}: {routes}"
            );
        }
        assert!(
            !is_bind(&mount_source(&c, n, "/data")),
            "{n}'s JetStream store is a named volume"
        );
    }
    let p = service(&c, "pagoda-cluster");
    assert_eq!(words(p.get("profiles"), "profiles"), ["cluster"]);
    let cmd = words(p.get("command"), "pagoda-cluster command");
    let url = cmd
        .iter()
        .position(|w| w == "--nats-url")
        .and_then(|i| cmd.get(i + 1))
        .expect("--nats-url");
    for n in nodes {
        assert!(
            url.contains(&format!("nats://{n}:4222")),
            "{url} misses {n}"
        );
    }
    assert!(cmd.windows(2).any(|w| w == ["--intake", "jetstream"]));
    assert_eq!(
        p.get("environment")
            .and_then(|e| e.get("PAGODA_INTAKE__STREAM__REPLICAS"))
            .and_then(Value::as_str),
        Some("3")
    );
}
