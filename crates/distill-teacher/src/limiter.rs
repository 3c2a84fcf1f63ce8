//! How many requests may be in flight: at most `max`, halved on a 429 (at most once per
//! `cooldown`, so one burst of 429s halves once), raised by one after `limit` successes in a
//! row without a 429 (additive increase, multiplicative decrease).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    successes: usize,
    last_decrease: Option<Instant>,
}

#[derive(Debug)]
pub struct Limiter {
    max: usize,
    cooldown: Duration,
    state: Mutex<State>,
    notify: Notify,
}

/// A slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.state.lock().expect("limiter lock").in_flight -= 1;
        self.limiter.notify.notify_waiters();
    }
}

impl Limiter {
    pub fn new(max: usize, cooldown: Duration) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Limiter {
            max,
            cooldown,
            state: Mutex::new(State {
                limit: max,
                in_flight: 0,
                successes: 0,
                last_decrease: None,
            }),
            notify: Notify::new(),
        })
    }

    /// Waits for a slot. Cancel-safe: dropping the future takes nothing.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if s.in_flight < s.limit {
                    s.in_flight += 1;
                    return Permit {
                        limiter: self.clone(),
                    };
                }
            }
            notified.await;
        }
    }

    pub fn on_rate_limited(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        let now = Instant::now();
        if s.last_decrease
            .is_none_or(|t| now.duration_since(t) >= self.cooldown)
        {
            s.limit = (s.limit / 2).max(1);
            s.last_decrease = Some(now);
        }
        s.successes = 0;
    }

    pub fn on_success(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.successes += 1;
        if s.successes >= s.limit && s.limit < self.max {
            s.limit += 1;
            s.successes = 0;
            drop(s);
            self.notify.notify_waiters();
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().expect("limiter lock").in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_429_and_grows_back() {
        // One burst halves once: a cooldown no test machine outlasts between two calls (with
        // 50 ms, a stall between them halved twice).
        let l = Limiter::new(8, Duration::from_secs(3600));
        l.on_rate_limited();
        l.on_rate_limited(); // same burst: halves once
        assert_eq!(l.limit(), 4);
        // A 429 after the cooldown halves again: with none, each one does.
        let l = Limiter::new(8, Duration::ZERO);
        l.on_rate_limited();
        l.on_rate_limited();
        assert_eq!(l.limit(), 2);
        for _ in 0..2 {
            l.on_success();
        }
        assert_eq!(l.limit(), 3);
        for _ in 0..100 {
            l.on_success();
        }
        assert_eq!(l.limit(), 8);
    }

    #[tokio::test]
    async fn blocks_at_the_limit_until_a_slot_frees() {
        let l = Limiter::new(2, Duration::ZERO);
        let a = l.acquire().await;
        let _b = l.acquire().await;
        assert_eq!(l.in_flight(), 2);
        let waiting = tokio::time::timeout(Duration::from_millis(30), l.acquire()).await;
        assert!(waiting.is_err(), "third permit granted over the limit");
        assert_eq!(l.in_flight(), 2, "a cancelled wait took a slot");
        let l2 = l.clone();
        let h = tokio::spawn(async move { l2.acquire().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(2), h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.in_flight(), 2);
        drop(c);
        assert_eq!(l.in_flight(), 1);
    }
}
