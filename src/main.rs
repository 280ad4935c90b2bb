//! `pagoda`: command-line entry point.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pagoda::config::Config;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::{SamplingParams, TokenId, TokenLogprobs};
use pagoda_actors::protocol::{ChatMessage, GenerateRequest, Prompt, StreamEvent};

#[derive(Parser)]
#[command(
    name = "pagoda",
    version,
    about = "LLM serving runtime whose front door is NATS"
)]
struct Cli {
    /// Configuration file (default: configs/default.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion in-process (through all five actors) and stream it to stdout.
    Generate(Box<GenerateArgs>),
    /// Benchmark pagoda (in-process or over NATS) and llama-server with the same requests.
    Bench(BenchArgs),
    /// Serve the engine on NATS (<prefix>.generate, <prefix>.cancel, $SRV.*).
    Serve(ServeArgs),
    /// Send one request to the engines on NATS and stream the answer to stdout.
    Request(Box<RequestArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Model: a GGUF file or a Hugging Face directory (default: model.path of the config).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    nats: pagoda::config::NatsArgs,
    /// Address of the /metrics and /health listener, e.g. 0.0.0.0:9464 (metrics.listen;
    /// an empty string turns it off).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Where requests come from: core NATS request/reply, or durable JetStream jobs on
    /// <prefix>.jobs.generate (intake.mode).
    #[arg(long, value_enum)]
    intake: Option<pagoda::config::IntakeMode>,
    /// Which actors this process runs (placement.role): all of them, the NATS edge with
    /// tokenizer and detokenizer (frontend), or scheduler, block manager and executor
    /// (engine). Frontends and engines find each other on the bus.
    #[arg(long, value_enum)]
    role: Option<pagoda::config::Role>,
}

#[derive(Args)]
struct RequestArgs {
    #[command(flatten)]
    nats: pagoda::config::NatsArgs,
    /// Send the prompt as one user message (the engine applies the chat template).
    #[arg(long)]
    chat: bool,
    /// Encode the request as JSON instead of MessagePack.
    #[arg(long)]
    json: bool,
    /// Request id (default: a fresh random one).
    #[arg(long)]
    id: Option<String>,
    /// Ask the engine to abort the request after this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Give up when nothing arrives for this many seconds.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    prompt: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Run the engine in this process (the default unless --nats-url or --llama-server-url
    /// is given; with --llama-server-url, measures both).
    #[arg(long, conflicts_with = "nats_url")]
    in_process: bool,
    /// Drive a pagoda already serving on this NATS URL instead of an engine in this process.
    #[arg(long, conflicts_with = "compare_nats_url")]
    nats_url: Option<String>,
    /// Also serve the in-process engine on this NATS server and measure both paths (direct
    /// and through NATS) at each concurrency in the same run.
    #[arg(long)]
    compare_nats_url: Option<String>,
    /// Also drive llama.cpp's llama-server at this URL (http://HOST:PORT) with the same
    /// prompts, through its streaming /completion endpoint, and print the ratios.
    #[arg(long, value_name = "URL")]
    llama_server_url: Option<String>,
    /// Reports saved by an earlier --save-result, shown, compared (ratio table) and
    /// plotted with this run's (e.g. llama-server's, measured while pagoda was not running).
    #[arg(long, value_name = "FILE.json")]
    baseline: Vec<PathBuf>,
    /// Model (default: model.path of the config).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Requests per run (default: --prompts-per-concurrency × concurrency, at least 8).
    #[arg(long)]
    num_prompts: Option<usize>,
    /// Without --num-prompts, each run sends this many requests per unit of concurrency
    /// (at least 8 in all).
    #[arg(long, default_value_t = 4, value_name = "K")]
    prompts_per_concurrency: usize,
    /// Concurrency levels to run, e.g. 1,8,32.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    sweep: Vec<usize>,
    /// One concurrency level (the same as --sweep N).
    #[arg(long, conflicts_with = "sweep")]
    max_concurrency: Option<usize>,
    /// Requests per second, arriving as a Poisson process (exponential gaps from the seeded
    /// generator); inf sends them all at once. Either way at most the concurrency level
    /// are in flight.
    #[arg(long, default_value = "inf", value_name = "R")]
    request_rate: f64,
    /// Prompts: `random` (random token ids of --input-len, the first --prefix-len shared),
    /// or a jsonl file, one {"prompt": "…"} or {"prompt_token_ids": […]} per line with an
    /// optional "output_len"; text prompts are sent as text.
    #[arg(long, default_value = "random", value_name = "random|FILE.jsonl")]
    dataset: String,
    /// Prompt length in tokens (random dataset).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens every random prompt starts with (the same ids in every prompt).
    #[arg(long, default_value_t = 0)]
    prefix_len: usize,
    /// Output length in tokens (dataset lines may set their own).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Keep generating past end-of-sequence, so every request yields exactly its output
    /// length; --ignore-eos=false lets requests stop at EOS.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    ignore_eos: bool,
    /// Every pagoda request under the JSON schema in this file (`guided_json`), to measure
    /// structured output's cost; with --ignore-eos=false implied. Prints the time the
    /// token masks took per step (in-process engine).
    #[arg(long, value_name = "SCHEMA.json", conflicts_with = "llama_server_url")]
    guided_json: Option<PathBuf>,
    /// Leave the in-process engine's prefix cache on (bench turns it off by default: every
    /// run reuses the same prompts, so a warm cache would flatter later runs). Also sets
    /// llama-server's cache_prompt.
    #[arg(long)]
    prefix_caching: bool,
    /// Seed of the prompts and of the arrival times (the same requests for every target
    /// and concurrency level).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature of every request (0: greedy). Above 0, request i is seeded
    /// with --seed + i, so runs compare the same samples.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Measure each concurrency level this many times, the targets' order reversed in
    /// every other pass (A B, B A, …); with --compare-nats-url, prints each pass's
    /// nats / in-process ratio and their median. Noisy machines need several.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Write the reports (baselines included) as JSON to this file.
    #[arg(long, value_name = "FILE.json")]
    save_result: Option<PathBuf>,
    /// Draw output throughput and TTFT p50 against concurrency, one line per target.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// No progress bar (it is drawn only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Model: a GGUF file or a Hugging Face directory (default: model.path of the config).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Apply the model's chat template to the prompt (as one user message).
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    prompt: String,
}

#[derive(Args)]
struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Tokens to generate at least (EOS is suppressed until then).
    #[arg(long, default_value_t = 0)]
    min_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Drop tokens below min_p × the top probability (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable); it is not part of the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Stop token id (repeatable).
    #[arg(long)]
    stop_token_id: Vec<u32>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Log-probability of each generated token and its K most likely alternatives (0..=20),
    /// printed on stderr.
    #[arg(long, value_name = "K")]
    logprobs: Option<u32>,
    /// The same for every prompt token after the first, printed on stderr.
    #[arg(long, value_name = "K")]
    prompt_logprobs: Option<u32>,
    /// Structured output: the answer is one of these (repeat the flag per choice).
    #[arg(long, value_name = "TEXT")]
    guided_choice: Vec<String>,
    /// Structured output: the answer fully matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    guided_regex: Option<String>,
    /// Structured output: the answer is JSON under this JSON schema (given inline).
    #[arg(long, value_name = "SCHEMA", value_parser = parse_json)]
    guided_json: Option<serde_json::Value>,
    /// Structured output: the answer is a sentence of this Lark grammar.
    #[arg(long, value_name = "LARK")]
    guided_grammar: Option<String>,
    /// Completions of the prompt (1..=32), sharing its KV blocks; with --seed, completion
    /// i samples with seed + i. Each is printed whole, prefixed with `[i]`.
    #[arg(long, default_value_t = 1)]
    n: u32,
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            max_tokens: self.max_tokens,
            min_tokens: self.min_tokens,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_id.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            guided_choice: (!self.guided_choice.is_empty()).then(|| self.guided_choice.clone()),
            guided_regex: self.guided_regex.clone(),
            guided_json: self.guided_json.clone(),
            guided_grammar: self.guided_grammar.clone(),
            response_format: None,
            n: self.n,
            speculate: true,
        }
    }
}

/// Prints log-probabilities on stderr, one token per line: `<what> <id> <logprob>` and the
/// alternatives as `id:logprob`.
fn print_logprobs<'a>(
    what: &str,
    ids: impl IntoIterator<Item = TokenId>,
    entries: impl IntoIterator<Item = Option<&'a TokenLogprobs>>,
) {
    for (id, lp) in ids.into_iter().zip(entries) {
        match lp {
            Some(lp) => {
                let top: Vec<String> = lp
                    .top_logprobs
                    .iter()
                    .map(|(t, l)| format!("{t}:{l:.4}"))
                    .collect();
                eprintln!("{what} {id} {:.4} [{}]", lp.logprob, top.join(" "));
            }
            None => eprintln!("{what} {id} -"),
        }
    }
}

/// The log-probabilities of a stream event or chunk, on stderr (see [`print_logprobs`]);
/// prompt tokens are shown by position (`prompt_position 3 …`).
fn print_event_logprobs(
    token_ids: &[TokenId],
    tokens: Option<&Vec<TokenLogprobs>>,
    prompt: Option<&Vec<Option<TokenLogprobs>>>,
    cumulative: Option<f64>,
) {
    if let Some(entries) = prompt {
        print_logprobs(
            "prompt_position",
            0..entries.len() as TokenId,
            entries.iter().map(Option::as_ref),
        );
    }
    if let Some(lps) = tokens {
        print_logprobs("token", token_ids.iter().copied(), lps.iter().map(Some));
    }
    if let Some(c) = cumulative {
        eprintln!("cumulative_logprob {c:.4}");
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` when set, else by `log.level`.
fn init_tracing(log: &pagoda::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match log.format {
        pagoda::config::LogFormat::Human => fmt.try_init(),
        pagoda::config::LogFormat::Json => fmt.json().try_init(),
    };
}

/// Exit status of `pagoda serve` when an actor died (sysexits' EX_SOFTWARE): the process
/// supervisor (compose `restart:`, systemd) starts a fresh one.
const EXIT_ENGINE_FAILED: u8 = 70;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let engine_failed = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<pagoda::gateway::GatewayError>(),
                    Some(pagoda::gateway::GatewayError::EngineFailed { .. })
                )
            });
            if engine_failed {
                // The dead actor's backtrace is printed off its thread: let it finish.
                pagoda_actors::supervisor::flush_panic_reports(std::time::Duration::from_secs(10));
                std::process::ExitCode::from(EXIT_ENGINE_FAILED)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    init_tracing(&config.log);
    match cli.command {
        Command::Generate(args) => {
            if let Some(m) = &args.model {
                config.engine.model.path = m.display().to_string();
            }
            config.validate()?;
            generate(config, *args)
        }
        Command::Bench(args) => {
            if let Some(m) = &args.model {
                config.engine.model.path = m.display().to_string();
            }
            config.validate()?;
            bench(config, args)
        }
        Command::Serve(args) => {
            if let Some(m) = &args.model {
                config.engine.model.path = m.display().to_string();
            }
            args.nats.apply(&mut config.nats);
            if let Some(listen) = args.metrics_listen {
                config.metrics.listen = listen;
            }
            if let Some(mode) = args.intake {
                config.intake.mode = mode;
            }
            if let Some(role) = args.role {
                config.placement.role = role;
            }
            config.validate()?;
            serve(config)
        }
        Command::Request(args) => {
            args.nats.apply(&mut config.nats);
            config.nats.validate()?;
            request(config, *args)
        }
    }
}

fn runtime() -> actix::SystemRunner {
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn bench(mut config: Config, mut args: BenchArgs) -> anyhow::Result<()> {
    use pagoda::bench::{self, workload::Dataset, Target};

    let sweep = match args.max_concurrency {
        Some(c) => vec![c],
        None => args.sweep.clone(),
    };
    if sweep.is_empty() || sweep.contains(&0) {
        anyhow::bail!("concurrency levels must be at least 1 (--sweep / --max-concurrency)");
    }
    if args.num_prompts == Some(0) {
        anyhow::bail!("--num-prompts must be at least 1");
    }
    if args.output_len == 0 {
        anyhow::bail!("--output-len must be at least 1");
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        anyhow::bail!("--request-rate must be a positive number of requests per second, or inf");
    }
    let mut dataset = if args.dataset == "random" {
        Dataset::random(args.input_len, args.prefix_len)?
    } else {
        Dataset::load(std::path::Path::new(&args.dataset))?
    };
    let mut baselines = Vec::new();
    for path in &args.baseline {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the baseline {}", path.display()))?;
        let reports: Vec<bench::BenchReport> = serde_json::from_str(&text).with_context(|| {
            format!(
                "the baseline {} is not a --save-result file of pagoda bench",
                path.display()
            )
        })?;
        baselines.extend(reports);
    }
    let guided_json: Option<serde_json::Value> = match &args.guided_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the schema {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("the schema {} is not JSON", path.display()))?,
            )
        }
        None => None,
    };
    if guided_json.is_some() {
        // A guided request ends when its grammar does (ignore_eos is refused with it).
        args.ignore_eos = false;
    }
    let in_process = args.in_process
        || args.compare_nats_url.is_some()
        || (args.nats_url.is_none() && args.llama_server_url.is_none());

    runtime().block_on(async move {
        // llama-server first: a wrong URL fails before the model loads.
        let llama = match &args.llama_server_url {
            Some(url) => {
                let server = bench::llama::LlamaServer::new(url)?;
                server.health().await.with_context(|| {
                    format!("llama-server at {url} is not ready (GET /health)")
                })?;
                eprintln!("llama-server {}", server.url());
                Some(server)
            }
            None => None,
        };
        let mut targets = Vec::new();
        let mut stop_gateway = None;
        let mut gateway_task = None;
        if let Some(url) = &args.nats_url {
            config.nats.url = url.clone();
            let client = pagoda::client::Client::connect_with(&config.nats).await?;
            targets.push(Target::Nats(client));
        }
        if in_process {
            // Every run reuses the same prompts (same seed), so a warm prefix cache would
            // flatter whichever run comes later: measure without it unless asked.
            config.engine.cache.enable_prefix_caching = args.prefix_caching;
            let engine = Engine::start(&config.engine).context("starting the engine")?;
            eprintln!(
                "model {} (prefix caching {}, int8 kernel {}, activations {:?}; cpu features {})",
                engine.info.model_path,
                if args.prefix_caching { "on" } else { "off" },
                pagoda_kernels::int8::level(),
                config.engine.model.activations,
                bench::cpu_features(),
            );
            dataset.fit_vocab(engine.info.vocab_size);
            targets.push(Target::InProcess(engine.clone()));
            if let Some(url) = &args.compare_nats_url {
                config.nats.url = url.clone();
                let nats = pagoda::nats::connect(
                    &config.nats,
                    pagoda::nats::InitialConnect::FromConfig,
                )
                .await?;
                let gateway = pagoda::gateway::GatewayConfig::from(&config.nats);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                stop_gateway = Some(tx);
                gateway_task = Some(tokio::spawn(pagoda::gateway::serve(
                    engine,
                    nats,
                    gateway,
                    async move {
                        let _ = rx.await;
                    },
                )));
                let client = pagoda::client::Client::connect_with(&config.nats).await?;
                targets.push(Target::Nats(client));
            }
        }
        if let Some(server) = llama {
            targets.push(Target::LlamaServer(server));
        }
        let rate = if args.request_rate.is_finite() {
            format!("{} req/s (Poisson)", args.request_rate)
        } else {
            "inf".into()
        };
        match &dataset {
            Dataset::Random {
                input_len,
                prefix_len,
                ..
            } => eprintln!(
                "random prompts: input {input_len} tokens (shared prefix {prefix_len}), output {} tokens, temperature {}, ignore_eos {}, request rate {rate}",
                args.output_len, args.temperature, args.ignore_eos
            ),
            Dataset::File { path, entries } => eprintln!(
                "dataset {} ({} prompts), output {} tokens unless a line says, temperature {}, ignore_eos {}, request rate {rate}",
                path.display(),
                entries.len(),
                args.output_len,
                args.temperature,
                args.ignore_eos
            ),
        }
        for r in &baselines {
            r.print();
        }
        let mut reports = baselines;
        for &c in &sweep {
            let spec = bench::BenchSpec {
                dataset: dataset.clone(),
                num_prompts: args
                    .num_prompts
                    .unwrap_or((args.prompts_per_concurrency.max(1) * c).max(8)),
                max_concurrency: c,
                request_rate: args.request_rate,
                output_len: args.output_len,
                ignore_eos: args.ignore_eos,
                cache_prompt: args.prefix_caching,
                seed: args.seed,
                temperature: args.temperature,
                progress: !args.no_progress,
                guided_json: guided_json.clone(),
            };
            let mut row = Vec::new();
            for round in 0..args.rounds as usize {
                for i in bench::round_order(targets.len(), round) {
                    let target = &targets[i];
                    let masks_before = pagoda_actors::guide::MaskTotals::now();
                    let spec_before = bench::spec_counts(target).await;
                    let mut report = bench::run(target, &spec).await;
                    report.round = round;
                    report.print();
                    if let (Some(a), Some(b)) = (spec_before, bench::spec_counts(target).await) {
                        let (runs, proposed, kept) = (
                            b.drafts - a.drafts,
                            b.draft_tokens - a.draft_tokens,
                            b.accepted_tokens - a.accepted_tokens,
                        );
                        if runs > 0 {
                            println!(
                                "speculative decoding (in-process engine): {runs} verifications, {proposed} draft tokens, {kept} accepted ({:.1} %), {:.2} tokens per verification step",
                                100.0 * kept as f64 / proposed.max(1) as f64,
                                1.0 + kept as f64 / runs as f64,
                            );
                        }
                    }
                    let masks = pagoda_actors::guide::MaskTotals::now().since(masks_before);
                    if masks.steps > 0 {
                        println!(
                            "guided masks (in-process engine): {:.3} ms per step ({} steps, {:.1} masks per step, {:.1} µs per mask), computed while the forward pass runs",
                            masks.nanos as f64 / 1e6 / masks.steps as f64,
                            masks.steps,
                            masks.masks as f64 / masks.steps as f64,
                            masks.nanos as f64 / 1e3 / masks.masks.max(1) as f64,
                        );
                    }
                    row.push(report);
                }
                let this = |t: &str| row.iter().find(|r| r.target == t && r.round == round);
                if let (Some(a), Some(b)) = (this("in-process"), this("nats")) {
                    let pass = if args.rounds > 1 {
                        format!(", pass {}", round + 1)
                    } else {
                        String::new()
                    };
                    println!(
                        "ratio nats / in-process at concurrency {c}{pass}: output throughput {:.3}, TTFT p50 {:+.1} ms, TTFT p99 {:+.1} ms",
                        b.output_throughput / a.output_throughput.max(f64::MIN_POSITIVE),
                        b.ttft_ms.p50 - a.ttft_ms.p50,
                        b.ttft_ms.p99 - a.ttft_ms.p99,
                    );
                }
            }
            let ratios = bench::nats_ratios(&row, c);
            if let (true, Some(m)) = (args.rounds > 1, bench::median(&ratios)) {
                let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
                println!(
                    "ratio nats / in-process at concurrency {c}, median of {} passes: {m:.3} ({})",
                    ratios.len(),
                    each.join(", ")
                );
            }
            reports.extend(row);
        }
        if let Some(tx) = stop_gateway {
            let _ = tx.send(());
        }
        if let Some(task) = gateway_task {
            let _ = task.await;
        }
        bench::print_summary(&reports);
        bench::print_ratios(&reports);
        if let Some(path) = &args.save_result {
            std::fs::write(path, serde_json::to_string_pretty(&reports)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &args.plot {
            bench::plot::plot(&reports, path)?;
            eprintln!("plot written to {}", path.display());
        }
        Ok(())
    })
}

fn generate(config: Config, args: GenerateArgs) -> anyhow::Result<()> {
    let params = args.sampling.params();
    let prompt = if args.chat {
        Prompt::Messages(vec![ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        }])
    } else {
        Prompt::Text(args.prompt.clone())
    };
    runtime().block_on(async move {
        let engine = Engine::start(&config.engine).context("starting the engine")?;
        let mut rx = engine.generate(GenerateRequest {
            id: "cli".into(),
            prompt,
            params,
        });
        let mut stdout = std::io::stdout().lock();
        if rx.n() > 1 {
            // Completions interleave: print each one whole once it ends.
            let mut texts = vec![String::new(); rx.n() as usize];
            let mut failed = false;
            while let Some((i, ev)) = rx.recv().await {
                let text = &mut texts[i as usize];
                match ev {
                    StreamEvent::Delta { text: t, .. } => text.push_str(&t),
                    StreamEvent::Finished {
                        text: t,
                        finish_reason,
                        usage,
                        timings,
                        ..
                    } => {
                        text.push_str(&t);
                        writeln!(stdout, "[{i}] {text}")?;
                        log_done("cli", finish_reason, &usage, &timings);
                    }
                    StreamEvent::Error(e) => {
                        writeln!(stdout, "[{i}] error: {}", e.message)?;
                        failed = true;
                    }
                }
            }
            if failed {
                anyhow::bail!("a completion failed");
            }
            return Ok(());
        }
        while let Some(ev) = rx.next_event().await {
            match ev {
                StreamEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                } => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                    print_event_logprobs(
                        &token_ids,
                        logprobs.tokens.as_ref(),
                        logprobs.prompt.as_ref(),
                        None,
                    );
                }
                StreamEvent::Finished {
                    text,
                    token_ids,
                    finish_reason,
                    usage,
                    timings,
                    logprobs,
                } => {
                    stdout.write_all(text.as_bytes())?;
                    writeln!(stdout)?;
                    stdout.flush()?;
                    print_event_logprobs(
                        &token_ids,
                        logprobs.tokens.as_ref(),
                        logprobs.prompt.as_ref(),
                        logprobs.cumulative,
                    );
                    log_done("cli", finish_reason, &usage, &timings);
                    return Ok(());
                }
                StreamEvent::Error(e) => anyhow::bail!("{}", e.message),
            }
        }
        anyhow::bail!("the engine stopped before the request finished")
    })
}

fn serve(config: Config) -> anyhow::Result<()> {
    use pagoda::config::Role;
    runtime().block_on(async move {
        // The listener comes first, so that /health answers 503 while the model loads.
        let metrics = if config.metrics.listen.is_empty() {
            None
        } else {
            let handle = pagoda::metrics::install_recorder(config.engine.model.max_model_len)?;
            Some(pagoda::metrics::MetricsServer::start(&config.metrics.listen, handle).await?)
        };
        let health = metrics.as_ref().map(|m| m.health.clone());
        match config.placement.role {
            Role::All | Role::Frontend => serve_frontend(&config, health).await?,
            Role::Engine => serve_engine(&config, health).await?,
        }
        if let Some(m) = metrics {
            m.stop();
        }
        Ok(())
    })
}

/// `--role all` (the whole engine here) or `--role frontend` (the NATS edge, tokenizer and
/// detokenizer; the rest in engine processes): the NATS front door.
async fn serve_frontend(
    config: &Config,
    health: Option<pagoda::metrics::Health>,
) -> anyhow::Result<()> {
    let nats =
        pagoda::nats::connect(&config.nats, pagoda::nats::InitialConnect::FromConfig).await?;
    let engine = match config.placement.role {
        pagoda::config::Role::Frontend => {
            let router = pagoda::placement::frontend::Router::subscribe(
                nats.clone(),
                &config.nats.subject_prefix,
                &config.engine.model.served_name(),
                &config.placement,
            )
            .await
            .context("subscribing to the engines' subjects")?;
            let (engine, outputs) = pagoda_actors::engine::Engine::start_frontend(
                &config.engine,
                router.backend.clone(),
            )
            .context("starting the frontend")?;
            router.run(pagoda::placement::frontend::RouterOutputs {
                tokens: outputs.tokens,
                ends: outputs.ends,
            });
            engine
        }
        _ => load_engine(&config.engine)?,
    };
    if config.log.stats_interval_s > 0 {
        pagoda::metrics::spawn_stats_logger(
            engine.clone(),
            std::time::Duration::from_secs(config.log.stats_interval_s),
        );
    }
    eprintln!(
        "pagoda {} serving {} on {} ({}.generate{})",
        env!("CARGO_PKG_VERSION"),
        engine.info.model_path,
        pagoda::nats::redact_url(&config.nats.url),
        config.nats.subject_prefix,
        match config.placement.role {
            pagoda::config::Role::Frontend => ", as a frontend",
            _ => "",
        }
    );
    let mut gateway = pagoda::gateway::GatewayConfig::from(&config.nats);
    gateway.log_prompts = config.log.prompts;
    if config.intake.mode == pagoda::config::IntakeMode::Jetstream {
        gateway.intake = Some(config.intake.clone());
    }
    if let Some(h) = &health {
        h.set_ready();
        // A dead actor turns /health to 503 at once, before any client hears of it.
        let h = h.clone();
        engine.supervisor().on_failure(move |_, _| h.set_failed());
    }
    let shutdown = async move {
        pagoda::gateway::shutdown_signal().await;
        if let Some(h) = health {
            h.set_draining();
        }
    };
    pagoda::gateway::serve(engine, nats, gateway, shutdown).await?;
    Ok(())
}

/// `--role engine`: scheduler, block manager and executor, serving the frontends.
async fn serve_engine(
    config: &Config,
    health: Option<pagoda::metrics::Health>,
) -> anyhow::Result<()> {
    let nats =
        pagoda::nats::connect(&config.nats, pagoda::nats::InitialConnect::FromConfig).await?;
    let ready_health = health.clone();
    let shutdown = async move {
        pagoda::gateway::shutdown_signal().await;
        if let Some(h) = health {
            h.set_draining();
        }
    };
    pagoda::placement::engine::serve(
        &config.engine,
        &config.placement,
        nats,
        &config.nats.subject_prefix,
        std::time::Duration::from_millis(config.nats.drain_timeout_ms),
        move |supervisor| {
            if let Some(h) = ready_health {
                h.set_ready();
                let h = h.clone();
                supervisor.on_failure(move |_, _| h.set_failed());
            }
        },
        shutdown,
    )
    .await?;
    Ok(())
}

/// Starts the engine, with a spinner on stderr while the model loads when stderr is a
/// terminal (nothing otherwise).
fn load_engine(cfg: &pagoda_actors::config::EngineConfig) -> anyhow::Result<Engine> {
    use std::io::IsTerminal;
    let spinner = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.set_message(format!("loading {}", cfg.model.path));
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let engine = Engine::start(cfg).context("starting the engine");
    if let Some(pb) = spinner {
        match &engine {
            Ok(_) => pb.finish_with_message(format!("loaded {}", cfg.model.path)),
            Err(_) => pb.abandon_with_message(format!("failed to load {}", cfg.model.path)),
        }
    }
    engine
}

fn request(config: Config, args: RequestArgs) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use pagoda_actors::protocol::{WireFormat, WireRequest};

    let mut req = if args.chat {
        WireRequest::chat(vec![ChatMessage::new("user", args.prompt.clone())])
    } else {
        WireRequest::text(args.prompt.clone())
    };
    req.id = args.id.clone();
    req.params = args.sampling.params();
    req.timeout_ms = args.timeout_ms;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let format = if args.json {
            WireFormat::Json
        } else {
            WireFormat::MsgPack
        };
        let client = pagoda::client::Client::connect_with(&config.nats)
            .await?
            .with_format(format)
            .with_idle_timeout(std::time::Duration::from_secs(args.idle_timeout.max(1)));
        let n = req.params.n;
        let mut answer = client.generate(req).await?;
        let mut stdout = std::io::stdout().lock();
        if n > 1 {
            // Completions interleave on the wire: print each one whole.
            for c in answer.collect_all().await? {
                match c {
                    Ok(c) => {
                        writeln!(stdout, "[{}] {}", c.index, c.text)?;
                        log_done(&c.id, c.finish_reason, &c.usage, &c.timings);
                    }
                    Err(e) => writeln!(stdout, "[?] error: {e}")?,
                }
            }
            return Ok(());
        }
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut cancelled = false;
        loop {
            let chunk = tokio::select! {
                c = answer.next() => c,
                _ = &mut ctrl_c, if !cancelled => {
                    // Ask for an abort; the final chunk still comes.
                    cancelled = true;
                    client.cancel(answer.id()).await?;
                    continue;
                }
            };
            let Some(chunk) = chunk else {
                anyhow::bail!("the answer ended without a final chunk");
            };
            let chunk = chunk?;
            stdout.write_all(chunk.text.as_bytes())?;
            stdout.flush()?;
            print_event_logprobs(
                &chunk.token_ids,
                chunk.logprobs.as_ref(),
                chunk.prompt_logprobs.as_ref(),
                chunk.cumulative_logprob,
            );
            if let Some(reason) = chunk.finish_reason {
                writeln!(stdout)?;
                stdout.flush()?;
                let usage = chunk.usage.unwrap_or_default();
                let timings = chunk.timings.unwrap_or_default();
                log_done(&chunk.id, reason, &usage, &timings);
                return Ok(());
            }
        }
    })
}

/// The closing log line of `generate` and `request` (stderr; stdout carries only text).
fn log_done(
    id: &str,
    reason: pagoda_actors::messages::FinishReason,
    usage: &pagoda_actors::protocol::Usage,
    timings: &pagoda_actors::protocol::Timings,
) {
    tracing::info!(
        id,
        finish_reason = reason.as_str(),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        ttft_ms = timings.ttft_ms,
        total_ms = timings.total_ms,
        "done"
    );
}
