//! The `herald` command: parse arguments, load and check the config, then serve until a signal.
//! This is the only place that uses `anyhow`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// jemalloc, not the system's malloc: an idle stream's few small allocations live for hours
/// between the transient buffers of other connections' handshakes and requests, and glibc's
/// malloc keeps the pages those leave behind (BENCHMARKS.md, "The allocator").
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation: freed pages go back to the OS from a
/// background thread after a second (`MADV_DONTNEED`, not the lazy `MADV_FREE` that still counts
/// as RSS), so a closed topic's memory leaves the process even when nothing else allocates
/// (`tests/hardening.rs`, `topic_memory_is_proportional_and_given_back`).
#[cfg(all(unix, not(target_env = "musl")))]
#[allow(unsafe_code, non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Exit code for a configuration that cannot be used (EX_USAGE, as linkerd does).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Turns a polled REST API into Server-Sent Events"
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log format (level via RUST_LOG, default info). Colour only on a terminal, never with
    /// NO_COLOR set.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve with the configuration (the default).
    Run,
    /// Validate the configuration and exit: 0 if valid, 64 with every problem listed if not.
    Check,
    /// Ask a running herald to reload its config file (POST /reload on its admin listener, with
    /// `[admin] token` or HERALD_ADMIN_TOKEN); the same as sending it SIGHUP. Exit 0 if
    /// reloaded, 64 if the new config was refused.
    Reload {
        /// The admin listener (default: `[admin] listen` of the config file).
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Ask a running herald whether it is alive (`/healthz`) or ready (`--ready`, `/readyz`) on
    /// its admin listener: exit 0 if so, 1 if not. For exec probes and HEALTHCHECK, when the
    /// admin listener is bound to loopback.
    Health {
        /// The admin listener (default: `[admin] listen` of the config file).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Readiness (serving, not draining) rather than liveness.
        #[arg(long)]
        ready: bool,
    },
    /// Start a built-in demo API and herald in front of it.
    Demo {
        /// Where herald listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo API listens (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        upstream_listen: SocketAddr,
        /// Where herald serves HTTPS (HTTP/2 and HTTP/1.1) with a self-signed certificate.
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: SocketAddr,
        /// Where the admin listener (status page, /metrics) goes; skipped if the port is taken.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormat::Pretty => herald::logging::Format::Text,
        LogFormat::Json => herald::logging::Format::Json,
    };
    if let Err(e) = herald::logging::init(format) {
        eprintln!("herald: cannot set up logging: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => match load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} stream routes)",
                    cli.config.display(),
                    c.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run => {
            // Config is parsed and validated before any port is bound or thread started.
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            report(runtime().and_then(|rt| rt.block_on(serve(config))))
        }
        Command::Reload { admin } => {
            let addr = match admin.map(Ok).unwrap_or_else(|| admin_addr(&cli.config)) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let token = admin_token(&cli.config);
            match runtime().and_then(|rt| rt.block_on(reload(addr, token))) {
                Ok(code) => code,
                Err(e) => report(Err(e)),
            }
        }
        Command::Health { admin, ready } => {
            let addr = match admin.map(Ok).unwrap_or_else(|| admin_addr(&cli.config)) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match runtime().and_then(|rt| rt.block_on(health(addr, ready))) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => report(Err(e)),
            }
        }
        Command::Demo {
            listen,
            upstream_listen,
            tls_listen,
            admin_listen,
        } => {
            report(runtime().and_then(|rt| {
                rt.block_on(demo(listen, upstream_listen, tls_listen, admin_listen))
            }))
        }
    }
}

/// Load and validate the config, and read its TLS files: everything a user fixes in the config,
/// reported the same way (exit 64) by `check` and `run`.
fn load(path: &std::path::Path) -> Result<herald::Config, String> {
    let config = herald::config::load(path).map_err(|e| e.to_string())?;
    if let Some(tls) = &config.tls {
        herald::server::tls::load(tls).map_err(|e| e.to_string())?;
        herald::server::tls::ticket_secret(tls).map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// Where the config file says the admin listener is.
fn admin_addr(path: &std::path::Path) -> Result<SocketAddr, String> {
    let config = herald::config::load(path).map_err(|e| {
        format!("{e}\nherald reload: the config has problems; nothing was sent (herald keeps its running config; pass --admin ADDR to ask it anyway)")
    })?;
    config.admin.map(|a| a.listen).ok_or_else(|| {
        format!(
            "{}: no [admin] section: pass --admin ADDR, or send herald SIGHUP",
            path.display()
        )
    })
}

/// The admin token for `herald reload`: the config file's, else the environment's.
fn admin_token(path: &std::path::Path) -> Option<String> {
    herald::config::load(path)
        .ok()
        .and_then(|c| c.admin)
        .and_then(|a| a.token)
        .map(|t| t.0)
        .or_else(|| std::env::var(herald::config::ADMIN_TOKEN_ENV).ok())
}

/// `herald health`: GET /healthz (or /readyz) and say whether it answered 200.
async fn health(addr: SocketAddr, ready: bool) -> anyhow::Result<bool> {
    let path = if ready { "readyz" } else { "healthz" };
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/{path}"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("asking herald's admin listener on {addr}"))?;
    let ok = resp.status().is_success();
    if !ok {
        eprintln!("herald: /{path} answered {}", resp.status());
    }
    Ok(ok)
}

/// `herald reload`: POST /reload and print what changed (or why the new config was refused).
async fn reload(addr: SocketAddr, token: Option<String>) -> anyhow::Result<ExitCode> {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/reload"))
        .timeout(Duration::from_secs(30));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking herald's admin listener on {addr} to reload"))?;
    let status = resp.status();
    let bytes = resp.bytes().await.context("reading the reload answer")?;
    let body: serde_json::Value =
        serde_json::from_slice(&bytes).context("reading the reload answer")?;
    if status.is_success() {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "herald refused the reload; it keeps running with its previous config:\n{}",
        body["message"].as_str().unwrap_or_default()
    );
    Ok(if status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: herald::Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    herald::shutdown::on_signal(shutdown.clone());
    herald::run(config, shutdown)
        .await
        .context("herald stopped")
}

async fn demo(
    listen: SocketAddr,
    upstream_listen: SocketAddr,
    tls_listen: SocketAddr,
    admin_listen: SocketAddr,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    herald::shutdown::on_signal(shutdown.clone());
    let upstream = TcpListener::bind(upstream_listen)
        .await
        .with_context(|| format!("binding the demo API on {upstream_listen}"))?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(herald::demo::serve_upstream(
        upstream,
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    // The status page is part of the demo when its port is free; a taken port is not worth failing
    // the demo for.
    let admin = match TcpListener::bind(admin_listen).await {
        Ok(probe) => probe.local_addr().ok(),
        Err(e) => {
            eprintln!(
                "herald demo: no status page ({admin_listen}: {e}); pass --admin-listen ADDR"
            );
            None
        }
    };
    let text = herald::demo::config_text(listen, upstream_addr, admin);
    let config = herald::config::parse(&text, "<demo config>").context("demo config")?;
    let mut herald = herald::Herald::new(config)?;
    let admin = herald.bind_admin().await?;
    let tls = herald::demo::self_signed_tls().context("making the demo certificate")?;
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("binding herald on {listen} (pass --listen ADDR to use another)")
    })?;
    let tls_listener = TcpListener::bind(tls_listen).await.with_context(|| {
        format!(
            "binding herald's HTTPS port on {tls_listen} (pass --tls-listen ADDR to use another)"
        )
    })?;
    let addr = listener.local_addr()?;
    let tls_port = tls_listener.local_addr()?.port();
    let (plain, https) = (
        format!("http://{addr}/"),
        format!("https://localhost:{tls_port}/"),
    );
    println!(
        "herald demo: legacy API on http://{upstream_addr}, herald on http://{addr} and https://localhost:{tls_port}\n\
         \n  open  {plain:<28}  live dashboard in a browser\
         \n  open  {https:<28}  the same over HTTPS and HTTP/2 (self-signed: accept the warning)\
         \n\n  curl -N -H 'Accept: text/event-stream' http://{addr}/api/builds/1\
         \n  curl -Nk --http2 -H 'Accept: text/event-stream' https://localhost:{tls_port}/api/builds/1\
         \n  curl http://{addr}/api/builds/1     the same resource, passed through\
         \n\nCtrl-C to stop.\n"
    );
    if let Some(a) = admin {
        println!("  status page and metrics: http://{a}/  http://{a}/metrics\n");
    }
    let listeners = vec![
        herald::server::Listener::plain(listener),
        herald::server::Listener::tls(tls_listener, tls),
    ];
    herald.serve_on(listeners, shutdown).await?;
    Ok(())
}
