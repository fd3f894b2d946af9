//! Herald with its admin listener on 127.0.0.1:0, and Prometheus text scraped over real HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A herald serving on 127.0.0.1:0 with `[admin]` bound to 127.0.0.1:0.
pub struct AdminHerald {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin: Arc<herald::admin::Admin>,
    pub hub: herald::hub::Hub,
    pub shutdown: CancellationToken,
    pub join: JoinHandle<herald::Result<()>>,
}

/// `[admin]` on a free port, to append to a test config.
pub const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

impl AdminHerald {
    pub async fn start(config: herald::Config) -> AdminHerald {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut herald = herald::Herald::new(config).unwrap();
        let admin_addr = herald
            .bind_admin()
            .await
            .unwrap()
            .expect("the config has [admin]");
        let admin = herald.admin().clone();
        let hub = herald.hub().clone();
        let shutdown = CancellationToken::new();
        let join = tokio::spawn(herald.serve(listener, shutdown.clone()));
        AdminHerald {
            addr,
            admin_addr,
            admin,
            hub,
            shutdown,
            join,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// `GET /metrics` over HTTP.
    pub async fn scrape(&self) -> Metrics {
        let resp = reqwest::get(self.admin_url("/metrics")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        Metrics(resp.text().await.unwrap())
    }

    /// Scrape until `cond` holds (bounded by `timeout`); returns the last scrape.
    pub async fn scrape_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = self.scrape().await;
            if cond(&m) || tokio::time::Instant::now() >= deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.join)
            .await
            .expect("herald stops within 15s")
            .unwrap()
            .unwrap();
    }
}

/// Prometheus text, read series by series.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of one series, written as it appears (`herald_streams_open{route="/a"}`); 0 when
    /// the series is absent (a counter that never moved).
    pub fn get(&self, series: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse().unwrap())
            })
            .unwrap_or(0.0)
    }
}
