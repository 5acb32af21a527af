//! Health endpoints like kube-proxy's: `/healthz` and `/livez` report whether programmed state
//! is fresh, and one `healthCheckNodePort` server per `externalTrafficPolicy: Local`
//! LoadBalancer Service tells the external load balancer whether this node has a local endpoint.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::translate::HealthCheck;

#[derive(Default)]
struct Times {
    /// A change is waiting to be applied since then.
    pending_since: Option<Instant>,
    /// The last sync that succeeded.
    last_applied: Option<(Instant, SystemTime)>,
}

/// Whether the agent keeps up: healthy once a first sync succeeded and no change has been waiting
/// longer than the timeout (kube-proxy's `--healthz` semantics). `/healthz` (readiness) reports
/// that; `/livez` (liveness) only fails once state that was fresh has gone stale.
pub struct HealthState {
    times: Mutex<Times>,
    timeout: Duration,
    /// Frontends the last sync wanted but could not program (no room): not healthy while any.
    unprogrammed: std::sync::atomic::AtomicUsize,
}

impl HealthState {
    pub fn new(timeout: Duration) -> Self {
        Self {
            times: Mutex::new(Times::default()),
            timeout,
            unprogrammed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many wanted frontends the last sync left unprogrammed.
    pub fn set_unprogrammed(&self, frontends: usize) {
        self.unprogrammed
            .store(frontends, std::sync::atomic::Ordering::Relaxed);
    }

    fn unprogrammed(&self) -> usize {
        self.unprogrammed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self) {
        let mut times = self.times();
        times.pending_since.get_or_insert_with(Instant::now);
    }

    /// Everything queued so far is programmed.
    pub fn applied(&self) {
        let mut times = self.times();
        times.pending_since = None;
        times.last_applied = Some((Instant::now(), SystemTime::now()));
    }

    /// Fresh (kube-proxy's meaning) and nothing wanted left unprogrammed.
    pub fn healthy(&self) -> bool {
        self.fresh() && self.unprogrammed() == 0
    }

    fn fresh(&self) -> bool {
        let times = self.times();
        times.last_applied.is_some()
            && times
                .pending_since
                .is_none_or(|since| since.elapsed() < self.timeout)
    }

    /// Alive unless programmed state went stale: before a first sync (e.g. the API server is
    /// still away) the pinned state serves, and restarting the agent would not help; neither
    /// would it for a Service that does not fit.
    pub fn live(&self) -> bool {
        self.times().last_applied.is_none() || self.fresh()
    }

    fn report(&self, healthy: bool) -> (StatusCode, Json<Value>) {
        let unix = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let last = self.times().last_applied.map(|(_, wall)| unix(wall));
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            Json(json!({
                "lastUpdated": last,
                "currentTime": unix(SystemTime::now()),
                "nodeEligible": true,
                "unprogrammedFrontends": self.unprogrammed(),
            })),
        )
    }
}

/// Serves `/healthz` and `/livez` on `listener` until the task is dropped.
pub fn serve_healthz(listener: tokio::net::TcpListener, state: Arc<HealthState>) -> JoinHandle<()> {
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(s): State<Arc<HealthState>>| async move { s.report(s.healthy()) }),
        )
        .route(
            "/livez",
            get(|State(s): State<Arc<HealthState>>| async move { s.report(s.live()) }),
        )
        .with_state(state);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            warn!("healthz server stopped: {err}");
        }
    })
}

/// The `healthCheckNodePort` servers, one per port, following the desired set.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, (JoinHandle<()>, Arc<RwLock<HealthCheck>>)>,
}

impl HealthCheckServers {
    /// Starts servers for new ports, updates the answers of existing ones and stops the rest.
    pub async fn reconcile(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (task, _)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "healthCheckNodePort server stopped");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some((_, current)) = self.servers.get(port) {
                *current.write().unwrap_or_else(|p| p.into_inner()) = check.clone();
                continue;
            }
            let addr = SocketAddr::from(([0, 0, 0, 0], *port));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let shared = Arc::new(RwLock::new(check.clone()));
                    let task = serve_health_check(listener, shared.clone());
                    info!(port, service = %check.service, "healthCheckNodePort server started");
                    self.servers.insert(*port, (task, shared));
                }
                Err(err) => {
                    warn!(port, service = %check.service, "cannot serve healthCheckNodePort: {err}")
                }
            }
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for (task, _) in self.servers.values() {
            task.abort();
        }
    }
}

fn serve_health_check(
    listener: tokio::net::TcpListener,
    check: Arc<RwLock<HealthCheck>>,
) -> JoinHandle<()> {
    let answer = |State(check): State<Arc<RwLock<HealthCheck>>>| async move {
        let check = check.read().unwrap_or_else(|p| p.into_inner()).clone();
        let status = if check.local_endpoints > 0 {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            Json(json!({
                "service": { "namespace": &*check.service.namespace, "name": &*check.service.name },
                "localEndpoints": check.local_endpoints,
                "serviceProxyHealthy": true,
            })),
        )
    };
    let app = Router::new().fallback(get(answer)).with_state(check);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontend_left_unprogrammed_makes_healthz_fail_but_not_livez() {
        let state = HealthState::new(Duration::from_secs(60));
        assert!(!state.healthy() && state.live(), "before the first sync");
        state.applied();
        assert!(state.healthy());
        state.set_unprogrammed(2);
        assert!(
            !state.healthy(),
            "a Service that does not fit is not healthy"
        );
        assert!(state.live(), "restarting would not make it fit");
        let (status, Json(body)) = state.report(state.healthy());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["unprogrammedFrontends"], 2);
        state.set_unprogrammed(0);
        assert!(state.healthy());
    }

    #[test]
    fn ready_after_a_sync_and_stale_when_a_change_waits_too_long() {
        let state = HealthState::new(Duration::from_millis(50));
        assert!(!state.healthy(), "not ready before the first sync");
        assert!(state.live(), "but alive: the pinned state serves");
        state.queued();
        state.applied();
        assert!(state.healthy() && state.live());
        state.queued();
        assert!(state.healthy(), "a fresh change is fine");
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !state.healthy() && !state.live(),
            "a change waiting past the timeout is not"
        );
        state.applied();
        assert!(state.healthy());
    }
}
