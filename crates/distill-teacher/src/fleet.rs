//! Several endpoints of one teacher. Each request goes to the endpoint with the least work in
//! flight (ties: the one that has served least). An endpoint whose requests fail
//! `fail_threshold` times in a row (connection errors, timeouts, 5xx, malformed bodies) is set
//! aside for a cooldown that doubles each time it fails again (up to `max_cooldown`); when the
//! cooldown ends one request probes it, and a success brings it back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use distill_core::Recipe;

use crate::{ApiKey, TeacherError};

#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub base_url: String,
    pub api_key: Option<ApiKey>,
}

#[derive(Debug, Clone, Copy)]
pub struct FleetPolicy {
    pub fail_threshold: u32,
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for FleetPolicy {
    fn default() -> Self {
        FleetPolicy {
            fail_threshold: 3,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// How a request to an endpoint went, as far as the endpoint's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The endpoint answered but not usefully for this request (429, 4xx): alive.
    Alive,
    /// Connection error, timeout, 5xx, malformed body.
    Fault,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    served: u64,
    failures: u32,
    set_aside_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
}

#[derive(Debug)]
pub struct Fleet {
    endpoints: Vec<EndpointSpec>,
    policy: FleetPolicy,
    state: Mutex<Vec<State>>,
    notify: Notify,
}

impl Fleet {
    pub fn new(endpoints: Vec<EndpointSpec>, policy: FleetPolicy) -> Self {
        assert!(!endpoints.is_empty(), "a fleet needs an endpoint");
        let state = endpoints
            .iter()
            .map(|_| State {
                cooldown: policy.cooldown,
                ..State::default()
            })
            .collect();
        Fleet {
            endpoints,
            policy,
            state: Mutex::new(state),
            notify: Notify::new(),
        }
    }

    pub fn endpoints(&self) -> &[EndpointSpec] {
        &self.endpoints
    }

    /// Every key, for redaction.
    pub fn keys(&self) -> Vec<ApiKey> {
        self.endpoints.iter().filter_map(|e| e.api_key.clone()).collect()
    }

    /// Picks an endpoint and counts a request in flight there; waits while every endpoint is
    /// set aside. Cancel-safe.
    pub async fn acquire(&self) -> usize {
        loop {
            let notified = self.notify.notified();
            let wait = {
                let mut st = self.state.lock().expect("fleet lock");
                let now = Instant::now();
                // A set-aside endpoint whose cooldown is over gets the next request as a probe.
                let probe = st
                    .iter()
                    .position(|s| !s.probing && s.set_aside_until.is_some_and(|t| t <= now));
                let pick = probe.or_else(|| {
                    st.iter()
                        .enumerate()
                        .filter(|(_, s)| s.set_aside_until.is_none())
                        .min_by_key(|(_, s)| (s.in_flight, s.served))
                        .map(|(i, _)| i)
                });
                match pick {
                    Some(i) => {
                        let s = &mut st[i];
                        if probe.is_some() {
                            s.probing = true;
                        }
                        s.in_flight += 1;
                        s.served += 1;
                        return i;
                    }
                    None => st
                        .iter()
                        .filter(|s| !s.probing)
                        .filter_map(|s| s.set_aside_until)
                        .min()
                        .map(|t| t.saturating_duration_since(now)),
                }
            };
            match wait {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Ends a request at endpoint `i`.
    pub fn release(&self, i: usize, health: Health) {
        let mut st = self.state.lock().expect("fleet lock");
        let s = &mut st[i];
        s.in_flight -= 1;
        match health {
            Health::Ok | Health::Alive => {
                if health == Health::Ok {
                    s.failures = 0;
                    s.cooldown = self.policy.cooldown;
                }
                if s.probing || health == Health::Ok {
                    s.set_aside_until = None;
                }
                s.probing = false;
            }
            Health::Fault => {
                s.failures += 1;
                let now = Instant::now();
                if s.probing {
                    s.probing = false;
                    s.cooldown = (s.cooldown * 2).min(self.policy.max_cooldown);
                    s.set_aside_until = Some(now + s.cooldown);
                } else if s.set_aside_until.is_none() && s.failures >= self.policy.fail_threshold {
                    s.set_aside_until = Some(now + s.cooldown);
                }
            }
        }
        drop(st);
        self.notify.notify_waiters();
    }

    /// Whether endpoint `i` is set aside now.
    pub fn is_set_aside(&self, i: usize) -> bool {
        self.state.lock().expect("fleet lock")[i]
            .set_aside_until
            .is_some()
    }

    pub fn served(&self, i: usize) -> u64 {
        self.state.lock().expect("fleet lock")[i].served
    }
}

/// (base URL, name of the key variable or None) for `base_url` then each of `endpoints`,
/// without repeats of the same URL with the same key.
pub fn endpoints(recipe: &Recipe) -> Vec<(String, Option<String>)> {
    let t = &recipe.teacher;
    let default_env = t.api_key_env.clone().filter(|e| !e.is_empty());
    let mut out: Vec<(String, Option<String>)> = vec![(t.base_url.clone(), default_env.clone())];
    for e in &t.endpoints {
        let env = match &e.api_key_env {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(v.clone()),
            None => default_env.clone(),
        };
        // The same server may be listed once per key (several API keys' worth of capacity).
        if !out
            .iter()
            .any(|(u, k)| u.trim_end_matches('/') == e.base_url.trim_end_matches('/') && *k == env)
        {
            out.push((e.base_url.clone(), env));
        }
    }
    out
}

/// The API key for `url` from the environment variable `var` (None or "": a server that
/// takes no key). The error names the variable, never a value.
pub fn key_from_env(url: &str, var: Option<&str>) -> Result<Option<ApiKey>, TeacherError> {
    let Some(var) = var.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(ApiKey::new(v.trim()))),
        _ => Err(TeacherError::Config(format!(
            "teacher.api_key_env: the environment variable {var} (the API key for {url}) is not set; export it, or set api_key_env = \"\" for a server that takes no key"
        ))),
    }
}

/// Reads each endpoint's key from its variable. The error names the variable, never a value.
pub fn resolve_keys(
    endpoints: &[(String, Option<String>)],
) -> Result<(Vec<EndpointSpec>, Vec<ApiKey>), TeacherError> {
    let mut specs = Vec::new();
    let mut keys = Vec::new();
    for (url, env) in endpoints {
        let api_key = key_from_env(url, env.as_deref())?;
        if let Some(k) = &api_key {
            keys.push(k.clone());
        }
        specs.push(EndpointSpec {
            base_url: url.clone(),
            api_key,
        });
    }
    Ok((specs, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Fleet {
        fleet_with(n, Duration::from_millis(40))
    }

    fn fleet_with(n: usize, cooldown: Duration) -> Fleet {
        let eps = (0..n)
            .map(|i| EndpointSpec {
                base_url: format!("http://e{i}"),
                api_key: None,
            })
            .collect();
        Fleet::new(
            eps,
            FleetPolicy {
                fail_threshold: 2,
                cooldown,
                max_cooldown: cooldown * 5,
            },
        )
    }

    #[tokio::test]
    async fn least_in_flight_wins() {
        let f = fleet(3);
        let picks = [f.acquire().await, f.acquire().await, f.acquire().await];
        assert_eq!(picks, [0, 1, 2]);
        f.release(1, Health::Ok);
        assert_eq!(f.acquire().await, 1);
        f.release(0, Health::Ok);
        f.release(2, Health::Ok);
        // 0 and 2 idle, 1 busy; 0 and 2 served once each: lowest index of the least served.
        assert_eq!(f.acquire().await, 0);
    }

    /// Ends endpoint `i`'s cooldown now, as waiting it out would.
    fn end_cooldown(f: &Fleet, i: usize) {
        if let Some(until) = f.state.lock().unwrap()[i].set_aside_until.as_mut() {
            *until = Instant::now();
        }
    }

    #[tokio::test]
    async fn failing_endpoints_are_set_aside_and_probed_again() {
        // Cooldowns that no test machine outlasts, ended by hand: no assertion depends on how
        // fast the steps run (with 40 ms ones, a stall of a few tens of ms failed it).
        let cooldown = Duration::from_secs(600);
        let f = fleet_with(2, cooldown);
        let (a, b) = (f.acquire().await, f.acquire().await);
        assert_eq!((a, b), (0, 1));
        f.release(a, Health::Fault);
        f.release(b, Health::Ok);
        assert!(!f.is_set_aside(0), "one failure is not enough");
        let a = f.acquire().await;
        assert_eq!(a, 0);
        f.release(a, Health::Fault);
        assert!(f.is_set_aside(0));
        // While set aside, everything goes to 1.
        for _ in 0..3 {
            let i = f.acquire().await;
            assert_eq!(i, 1);
            f.release(i, Health::Ok);
        }
        end_cooldown(&f, 0);
        // Cooldown over: the next request probes 0; a failed probe doubles the cooldown.
        let i = f.acquire().await;
        assert_eq!(i, 0);
        f.release(i, Health::Fault);
        assert!(f.is_set_aside(0));
        assert_eq!(f.state.lock().unwrap()[0].cooldown, 2 * cooldown);
        for _ in 0..2 {
            assert_eq!(f.acquire().await, 1, "0 is set aside again");
            f.release(1, Health::Ok);
        }
        end_cooldown(&f, 0);
        let i = f.acquire().await;
        assert_eq!(i, 0);
        f.release(i, Health::Ok);
        assert!(!f.is_set_aside(0));
        assert_eq!(
            f.state.lock().unwrap()[0].cooldown,
            cooldown,
            "a success resets it"
        );
    }

    #[tokio::test]
    async fn with_every_endpoint_set_aside_requests_wait_for_a_probe() {
        let f = fleet(1);
        // Taken before the failure that sets 0 aside for 40 ms: the wait below is at least that
        // long from here, however long the steps in between take.
        let t = Instant::now();
        for _ in 0..2 {
            let i = f.acquire().await;
            f.release(i, Health::Fault);
        }
        let i = f.acquire().await;
        assert_eq!(i, 0);
        assert!(t.elapsed() >= Duration::from_millis(40), "{:?}", t.elapsed());
        f.release(i, Health::Ok);
    }
}
