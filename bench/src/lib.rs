//! Tandem's benchmark (`make bench`): a load generator without coordinated omission, a fixed
//! upstream, the bare Pingora floor, and the orchestrator that measures direct, bare Pingora,
//! HAProxy, nginx and tandem-proxy (one and two hops) side by side and writes a Markdown report
//! with an SVG chart; the capture run (the two hops behind real iptables rules in network
//! namespaces); the tracing topologies' OTLP load sink; and the resilience run (success rate while an endpoint misbehaves).

pub mod admin;
pub mod capture;
pub mod chart;
pub mod loadgen;
pub mod mtls;
pub mod netns;
pub mod otlp_sink;
pub mod pingora_floor;
pub mod procfs;
pub mod report;
pub mod resilience;
pub mod run;
pub mod schedule;
pub mod signer;
pub mod stats;
pub mod tandem;
pub mod topology;
pub mod upstream;
