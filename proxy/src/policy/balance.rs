//! Choosing an endpoint for one attempt.
//!
//! Three algorithms over a destination's endpoints:
//! - peak EWMA with power of two choices (the default, as Linkerd): two endpoints drawn at
//!   random, the one with the lower `rtt × (in flight + 1)` wins;
//! - least request: the same two random draws, fewer requests in flight wins;
//! - round robin: each endpoint in turn, from a shared atomic cursor.
//!
//! Candidates are considered in three stages. First the endpoints outlier detection allows,
//! except the one the previous attempt failed on (a retry goes elsewhere when it can). Then the
//! failed one too. Then, when every endpoint is ejected, all of them: panic mode, as Envoy, on
//! the reasoning that sending to endpoints believed bad beats failing every request.
//! An endpoint whose ejection is over is preferred, and claimed atomically, so exactly one
//! request probes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_crds::contract::LoadBalancer;

use super::endpoint::{Availability, EndpointState};
use super::sources::{Nanos, Random, RandomExt};

/// The outcome of a pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into the endpoint list.
    pub index: usize,
    /// This attempt is the endpoint's single half-open probe.
    pub probe: bool,
    /// Every endpoint was ejected, so this one was picked regardless.
    pub panic: bool,
}

/// What a stage may pick.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Available endpoints other than the one to avoid.
    Preferred,
    /// Available endpoints, the avoided one included.
    Available,
    /// Every endpoint (panic mode).
    Panic,
}

/// Picks an endpoint, or `None` when the list is empty.
pub fn pick(
    algorithm: LoadBalancer,
    endpoints: &[Arc<EndpointState>],
    avoid: Option<SocketAddr>,
    cursor: &AtomicUsize,
    now: Nanos,
    random: &dyn Random,
) -> Option<Pick> {
    if endpoints.is_empty() {
        return None;
    }
    // One step of the round-robin cursor per pick, whatever the stages below try.
    let start = match algorithm {
        LoadBalancer::RoundRobin => cursor.fetch_add(1, Ordering::Relaxed),
        LoadBalancer::PeakEwma | LoadBalancer::LeastRequest => 0,
    };
    for stage in [Stage::Preferred, Stage::Available, Stage::Panic] {
        if stage == Stage::Available && avoid.is_none() {
            continue;
        }
        // A probe claim can lose a race; the loser's endpoint is then unavailable, so each
        // round has fewer candidates and the loop ends.
        for _ in 0..=endpoints.len() {
            let eligible = |i: usize| eligible(&endpoints[i], stage, avoid, now);
            let Some(index) = choose(algorithm, endpoints, &eligible, start, now, random) else {
                break;
            };
            let endpoint = &endpoints[index];
            if stage == Stage::Panic {
                return Some(Pick {
                    index,
                    probe: false,
                    panic: true,
                });
            }
            match endpoint.availability(now) {
                Availability::Ready => {
                    return Some(Pick {
                        index,
                        probe: false,
                        panic: false,
                    });
                }
                Availability::ProbeReady if endpoint.claim_probe(now) => {
                    return Some(Pick {
                        index,
                        probe: true,
                        panic: false,
                    });
                }
                Availability::ProbeReady | Availability::Unavailable => {}
            }
        }
    }
    None
}

fn eligible(e: &EndpointState, stage: Stage, avoid: Option<SocketAddr>, now: Nanos) -> bool {
    match stage {
        Stage::Panic => true,
        Stage::Available => e.availability(now) != Availability::Unavailable,
        Stage::Preferred => {
            Some(e.address()) != avoid && e.availability(now) != Availability::Unavailable
        }
    }
}

fn choose(
    algorithm: LoadBalancer,
    endpoints: &[Arc<EndpointState>],
    eligible: &dyn Fn(usize) -> bool,
    start: usize,
    now: Nanos,
    random: &dyn Random,
) -> Option<usize> {
    match algorithm {
        LoadBalancer::RoundRobin => round_robin(endpoints.len(), eligible, start),
        LoadBalancer::PeakEwma => two_choices(endpoints.len(), eligible, random, |i| {
            preference(&endpoints[i], now, endpoints[i].cost(now))
        }),
        LoadBalancer::LeastRequest => two_choices(endpoints.len(), eligible, random, |i| {
            preference(&endpoints[i], now, f64::from(endpoints[i].in_flight()))
        }),
    }
}

/// Lower is better; an endpoint waiting for its probe beats any cost, so it gets its probe.
fn preference(e: &EndpointState, now: Nanos, cost: f64) -> f64 {
    if e.availability(now) == Availability::ProbeReady {
        f64::NEG_INFINITY
    } else {
        cost
    }
}

/// The first eligible endpoint from the cursor's position on.
fn round_robin(n: usize, eligible: &dyn Fn(usize) -> bool, start: usize) -> Option<usize> {
    (0..n)
        .map(|step| start.wrapping_add(step) % n)
        .find(|&i| eligible(i))
}

/// Power of two choices: two distinct random endpoints, the cheaper wins. When neither draw is
/// eligible (many endpoints ejected), the first two eligible ones after a random offset compete.
fn two_choices(
    n: usize,
    eligible: &dyn Fn(usize) -> bool,
    random: &dyn Random,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let below = |k: usize| usize::try_from(random.below(k as u64)).unwrap_or(0);
    let a = below(n);
    let b = if n > 1 { (a + 1 + below(n - 1)) % n } else { a };
    let (a, b) = match (eligible(a), eligible(b)) {
        (true, true) => (a, b),
        (true, false) => return Some(a),
        (false, true) => return Some(b),
        (false, false) => {
            let mut found = (1..n).map(|s| (a + s) % n).filter(|&i| eligible(i));
            let first = found.next()?;
            match found.next() {
                Some(second) => (first, second),
                None => return Some(first),
            }
        }
    };
    // Ties go to the first draw, which is random, so ties spread evenly.
    Some(if cost(b) < cost(a) { b } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::endpoint::EJECTED;
    use crate::policy::sources::SeededRandom;
    use std::time::Duration;

    const NOW: Nanos = Nanos(1_000_000_000);

    fn endpoints(n: u8) -> Vec<Arc<EndpointState>> {
        (1..=n)
            .map(|i| {
                Arc::new(EndpointState::new(
                    SocketAddr::from(([10, 0, 0, i], 80)),
                    NOW,
                ))
            })
            .collect()
    }

    fn eject(e: &EndpointState, until: Nanos) {
        e.outlier.ejected_until.store(until.0, Ordering::SeqCst);
        e.outlier.phase.store(EJECTED, Ordering::SeqCst);
    }

    fn counts(
        algorithm: LoadBalancer,
        eps: &[Arc<EndpointState>],
        avoid: Option<SocketAddr>,
        picks: usize,
    ) -> Vec<usize> {
        let random = SeededRandom::new(9);
        let cursor = AtomicUsize::new(0);
        let mut counts = vec![0; eps.len()];
        for _ in 0..picks {
            let p = pick(algorithm, eps, avoid, &cursor, NOW, &random).unwrap();
            counts[p.index] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_visits_each_endpoint_in_turn() {
        let eps = endpoints(3);
        assert_eq!(
            counts(LoadBalancer::RoundRobin, &eps, None, 300),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn peak_ewma_sends_most_traffic_to_the_fastest_endpoint() {
        let eps = endpoints(3);
        eps[0].record_rtt(Duration::from_millis(5), false, NOW);
        eps[1].record_rtt(Duration::from_millis(50), false, NOW);
        eps[2].record_rtt(Duration::from_millis(500), false, NOW);
        let c = counts(LoadBalancer::PeakEwma, &eps, None, 3_000);
        // With two choices the slowest only wins when drawn twice, which cannot happen.
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[0] > c[1], "{c:?}");
    }

    #[test]
    fn peak_ewma_is_penalised_by_requests_in_flight() {
        let eps = endpoints(2);
        for e in &eps {
            e.record_rtt(Duration::from_millis(10), false, NOW);
        }
        for _ in 0..5 {
            eps[0].start_request();
        }
        let c = counts(LoadBalancer::PeakEwma, &eps, None, 100);
        assert_eq!(c, vec![0, 100]);
    }

    #[test]
    fn least_request_prefers_fewer_requests_in_flight() {
        let eps = endpoints(3);
        eps[0].start_request();
        eps[1].start_request();
        eps[1].start_request();
        let c = counts(LoadBalancer::LeastRequest, &eps, None, 3_000);
        assert!(c[2] > c[0] && c[0] > c[1], "{c:?}");
    }

    #[test]
    fn a_retry_prefers_a_different_endpoint_from_the_one_that_failed() {
        for algorithm in [
            LoadBalancer::PeakEwma,
            LoadBalancer::RoundRobin,
            LoadBalancer::LeastRequest,
        ] {
            let eps = endpoints(3);
            // Make the failed endpoint the most attractive, so avoiding it is a real choice.
            eps[1].record_rtt(Duration::from_millis(1), false, NOW);
            let c = counts(algorithm, &eps, Some(eps[1].address()), 300);
            assert_eq!(c[1], 0, "{algorithm:?}: {c:?}");
        }
    }

    #[test]
    fn a_retry_returns_to_the_failed_endpoint_when_it_is_the_only_one() {
        let eps = endpoints(1);
        let c = counts(LoadBalancer::PeakEwma, &eps, Some(eps[0].address()), 10);
        assert_eq!(c, vec![10]);
    }

    #[test]
    fn ejected_endpoints_get_no_traffic() {
        let eps = endpoints(3);
        eject(&eps[0], NOW.after(Duration::from_secs(30)));
        for algorithm in [LoadBalancer::PeakEwma, LoadBalancer::RoundRobin] {
            assert_eq!(counts(algorithm, &eps, None, 300)[0], 0);
        }
    }

    #[test]
    fn panic_mode_uses_every_endpoint_when_all_are_ejected() {
        let eps = endpoints(3);
        for e in &eps {
            eject(e, NOW.after(Duration::from_secs(30)));
        }
        let random = SeededRandom::new(1);
        let cursor = AtomicUsize::new(0);
        let mut seen = [false; 3];
        for _ in 0..30 {
            let p = pick(LoadBalancer::RoundRobin, &eps, None, &cursor, NOW, &random).unwrap();
            assert!(p.panic && !p.probe);
            seen[p.index] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn exactly_one_request_probes_an_endpoint_whose_ejection_is_over() {
        let eps = endpoints(3);
        eject(&eps[0], NOW);
        let random = SeededRandom::new(5);
        let cursor = AtomicUsize::new(0);
        let picks: Vec<Pick> = (0..100)
            .map(|_| pick(LoadBalancer::PeakEwma, &eps, None, &cursor, NOW, &random).unwrap())
            .collect();
        let probes: Vec<&Pick> = picks.iter().filter(|p| p.probe).collect();
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].index, 0);
        assert_eq!(picks.iter().filter(|p| p.index == 0).count(), 1);
        // An unanswered probe is given back for the next request.
        eps[0].release_probe();
        let p = pick(LoadBalancer::PeakEwma, &eps, None, &cursor, NOW, &random).unwrap();
        assert!(p.probe && p.index == 0);
    }

    #[test]
    fn an_empty_endpoint_list_picks_nothing() {
        let random = SeededRandom::new(1);
        let cursor = AtomicUsize::new(0);
        assert_eq!(
            pick(LoadBalancer::PeakEwma, &[], None, &cursor, NOW, &random),
            None
        );
    }
}
