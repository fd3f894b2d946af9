//! Config reload (SIGHUP, `POST /reload`, `herald reload`): read and validate the file again; if it
//! is invalid, log every problem (`file:line:col: key: message`) and keep running as before. If it
//! is valid, swap the route table: unchanged routes keep their id, topics and streams; a removed
//! or changed route is retired (its streams end with a final `shutdown` event so clients reconnect
//! to the new config; a changed route's new topics get its new settings). Settings that cannot
//! change live (listen address, TLS files, `[sse]`…) are reported as needing a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use http::StatusCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, Config, ConfigError};
use crate::hub::Hub;
use crate::routes::{LiveRoutes, Route, RouteTable};
use crate::shutdown::Hangups;
use crate::telemetry::Metrics;

/// What a successful reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub status: &'static str,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: usize,
    /// Topics closed because their route was removed or changed.
    pub topics_closed: usize,
    /// Top-level settings that differ from the running ones but only take effect on restart.
    pub restart_required: Vec<String>,
}

/// Why a reload was refused; the running config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("herald was not started from a config file; there is nothing to reload")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
}

impl ReloadError {
    pub fn status(&self) -> StatusCode {
        match self {
            ReloadError::NoFile => StatusCode::CONFLICT,
            ReloadError::Config(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::NoFile => "no-config-file",
            ReloadError::Config(_) => "invalid-config",
        }
    }
}

/// Reloads the config: what SIGHUP and `POST /reload` both call.
pub struct Reloader {
    /// The config in force: startup settings, with routes as last reloaded; the base of the next
    /// reload's comparison.
    running: Mutex<Arc<Config>>,
    /// One reload at a time (SIGHUP and `POST /reload` may race).
    reloading: Mutex<()>,
    routes: Arc<LiveRoutes>,
    hub: Hub,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    pub fn new(
        running: Arc<Config>,
        routes: Arc<LiveRoutes>,
        hub: Hub,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            running: Mutex::new(running),
            reloading: Mutex::new(()),
            routes,
            hub,
            metrics,
        }
    }

    /// Reload on every SIGHUP until `cancel`, off the async workers.
    pub async fn on_hangups(self: Arc<Self>, mut hangups: Hangups, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = hangups.next() => {}
            }
            info!("SIGHUP: reloading the config");
            let me = self.clone();
            // The outcome is logged by `reload`.
            let _ = tokio::task::spawn_blocking(move || me.reload()).await;
        }
    }

    /// Reload the config file (blocking: call it off the async workers). Logs the outcome.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(path) = running.source.clone() else {
            warn!("config reload requested, but herald was not started from a file");
            return Err(ReloadError::NoFile);
        };
        let new = match config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.reload(false);
                if e.problems().is_empty() {
                    warn!(error = %e, "config reload rejected; the running config stays in force");
                }
                for line in e.to_string().lines() {
                    warn!(
                        problem = line,
                        "config reload rejected; the running config stays in force"
                    );
                }
                return Err(e.into());
            }
        };
        let mut report = self.apply(&new);
        report.restart_required = restart_required(&running, &new);
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(Config {
            routes: new.routes,
            ..(*running).clone()
        });
        self.metrics.reload(true);
        info!(
            file = %path.display(),
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            unchanged = report.unchanged,
            topics_closed = report.topics_closed,
            "config reloaded"
        );
        if !report.restart_required.is_empty() {
            warn!(
                settings = ?report.restart_required,
                "config reload: these settings changed but take effect only after a restart; the running values stay"
            );
        }
        Ok(report)
    }

    /// Swap in `new`'s routes, keeping the `Route`s (ids, topics, streams) of unchanged ones.
    fn apply(&self, new: &Config) -> ReloadReport {
        let routes = &self.routes;
        let table = routes.current();
        let old: HashMap<&str, &Arc<Route>> = table
            .routes()
            .iter()
            .map(|r| (r.config.template.source.as_str(), r))
            .collect();
        let mut report = ReloadReport {
            status: "reloaded",
            ..ReloadReport::default()
        };
        let mut next = Vec::with_capacity(new.routes.len());
        for r in &new.routes {
            let source = &r.template.source;
            match old.get(source.as_str()) {
                Some(o) if same_route(&o.config, r) => {
                    report.unchanged += 1;
                    next.push((*o).clone());
                    continue;
                }
                Some(_) => report.changed.push(source.clone()),
                None => report.added.push(source.clone()),
            }
            next.push(Arc::new(Route::new(routes.next_id(), r.clone())));
        }
        let retired: Vec<Arc<Route>> = table
            .routes()
            .iter()
            .filter(|o| !next.iter().any(|n| Arc::ptr_eq(n, o)))
            .cloned()
            .collect();
        for o in &retired {
            if !report.changed.contains(&o.config.template.source) {
                report.removed.push(o.config.template.source.clone());
            }
        }
        routes.replace(RouteTable::from_routes(next));
        // After the swap no request resolves these routes again; one that resolved one just
        // before is refused when it subscribes (`Hub::subscribe` checks the flag).
        for o in retired {
            report.topics_closed += self.hub.retire_route(&o);
        }
        report
    }
}

/// Two routes with the same settings. `Debug` covers every field, including ones added later,
/// without requiring them all to implement `PartialEq`.
fn same_route(a: &config::Route, b: &config::Route) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The top-level settings (other than routes and the file name) that differ.
fn restart_required(running: &Config, new: &Config) -> Vec<String> {
    let fields = |c: &Config| {
        let text = format!(
            "{:#?}",
            Config {
                source: None,
                routes: Vec::new(),
                ..c.clone()
            }
        );
        top_level_fields(&text)
    };
    let (a, b) = (fields(running), fields(new));
    let mut names: Vec<String> = b
        .iter()
        .filter(|(name, value)| a.get(*name) != Some(value))
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

/// `{:#?}` of a struct, split by top-level field: `name → its text`.
fn top_level_fields(text: &str) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let top = line
            .strip_prefix("    ")
            .filter(|rest| !rest.starts_with(' '))
            .and_then(|rest| rest.split_once(':'))
            .map(|(name, _)| name)
            .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if let Some(name) = top {
            current = Some(name.to_string());
        }
        if let Some(name) = &current {
            let entry = out.entry(name.clone()).or_default();
            entry.push_str(line);
            entry.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_changed_sections() {
        let a = config::parse(
            "listen = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[sse]\nretry = \"1s\"\n",
            "a",
        )
        .unwrap();
        let b = config::parse(
            "listen = \"127.0.0.1:2\"\nupstream = \"http://a\"\n[sse]\nretry = \"2s\"\n[[route]]\npath = \"/x\"\n",
            "b",
        )
        .unwrap();
        assert_eq!(restart_required(&a, &b), vec!["listen", "sse"]);
        assert!(restart_required(&a, &a).is_empty());
    }

    #[test]
    fn cluster_settings_compare_by_value_and_hide_the_password() {
        let parse = |url: &str| {
            config::parse(
                &format!("listen = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[cluster]\nredis = \"{url}\"\nsecret = \"0123456789abcdef\"\n"),
                "c",
            )
            .unwrap()
        };
        // A node named by default (no `node`) is the same node at every reload.
        let (a, b) = (parse("redis://:pw1@r:6379"), parse("redis://:pw1@r:6379"));
        assert!(restart_required(&a, &b).is_empty());
        let c = parse("redis://:pw2@r:6380");
        assert_eq!(restart_required(&a, &c), vec!["cluster"]);
        assert!(!format!("{a:?}").contains("pw1"));
    }
}
