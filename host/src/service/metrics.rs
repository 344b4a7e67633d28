//! Prometheus metrics, recorded per server (not process-global, so several
//! servers in one process, as in tests, keep separate counts).

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::runtime::StatsSnapshot;

const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Histogram samples wait in the recorder, 8 bytes each, until a scrape or
/// an upkeep folds them into the buckets; with nobody scraping `/metrics`
/// they piled up for ever (the host's RSS grew about 65 bytes per
/// invocation once malloc's arenas had spread them). Folding every this
/// many samples bounds that buffer to a few KiB whether or not anyone
/// scrapes, at the cost of one short registry walk per this many calls.
const UPKEEP_EVERY: u64 = 1024;

pub(super) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Histogram samples recorded so far, to schedule upkeeps.
    samples: AtomicU64,
}

impl Metrics {
    pub(super) fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("gust_invocation_duration_seconds".into()),
                DURATION_BUCKETS,
            )
            .map(|builder| builder.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            samples: AtomicU64::new(0),
        }
    }

    /// One finished invocation: `outcome` is one of the fixed outcome codes.
    pub(super) fn invocation(&self, outcome: &'static str, seconds: f64) {
        with_local_recorder(&self.recorder, || {
            counter!("gust_invocations_total", "outcome" => outcome).increment(1);
            histogram!("gust_invocation_duration_seconds").record(seconds);
        });
        if self.samples.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY == UPKEEP_EVERY - 1 {
            self.handle.run_upkeep();
        }
    }

    /// An invocation record the store accepted, and the `pruned` older
    /// records (or itself, with a retention of 0) that retention dropped for
    /// it: written minus pruned is what the store holds, so a soak can prove
    /// that no record went missing.
    pub(super) fn record_written(&self, pruned: u64) {
        with_local_recorder(&self.recorder, || {
            counter!("gust_invocation_records_total", "result" => "written").increment(1);
            counter!("gust_invocation_records_pruned_total").increment(pruned);
        });
    }

    /// An invocation record the store refused (logged by the caller).
    pub(super) fn record_failed(&self) {
        with_local_recorder(&self.recorder, || {
            counter!("gust_invocation_records_total", "result" => "failed").increment(1);
        });
    }

    /// A request refused before it ran (`reason`: fixed set).
    pub(super) fn rejected(&self, reason: &'static str) {
        with_local_recorder(&self.recorder, || {
            counter!("gust_rejected_total", "reason" => reason).increment(1);
        });
    }

    /// A deploy with its result (`created`, `unchanged`, `invalid`).
    pub(super) fn deploy(&self, result: &'static str) {
        with_local_recorder(&self.recorder, || {
            counter!("gust_deploys_total", "result" => result).increment(1);
        });
    }

    /// Jobs waiting and running host-wide (per tenant: `GET /v1/jobs/{id}`;
    /// tenants are unbounded, so no label).
    pub(super) fn jobs(&self, queued: usize, running: usize) {
        with_local_recorder(&self.recorder, || {
            gauge!("gust_jobs_queued").set(queued as f64);
            gauge!("gust_jobs_running").set(running as f64);
        });
    }

    /// Prometheus text, with the runtime's counters and gauges brought up to date.
    pub(super) fn render(
        &self,
        stats: StatsSnapshot,
        in_flight: usize,
        functions: usize,
        devices: &[gust_gpu_bridge::Device],
        models: gust_gpu_bridge::models::RegistryStats,
    ) -> String {
        with_local_recorder(&self.recorder, || {
            counter!("gust_compile_total").absolute(stats.compiles);
            counter!("gust_cache_hits_total").absolute(stats.cache_hits);
            counter!("gust_cache_rejections_total").absolute(stats.cache_rejections);
            counter!("gust_instantiations_total").absolute(stats.instantiations);
            counter!("gust_instance_reuses_total").absolute(stats.reuses);
            counter!("gust_instance_ready_hits_total").absolute(stats.ready_hits);
            gauge!("gust_invocations_in_flight").set(in_flight as f64);
            gauge!("gust_functions_loaded").set(functions as f64);
            // Every tenant's model loads together (each tenant sees its own
            // in GET /v1/models).
            counter!("gust_model_loads_total").absolute(models.loads);
            counter!("gust_model_load_hits_total").absolute(models.hits);
            counter!("gust_model_load_failures_total").absolute(models.failures);
            counter!("gust_model_evictions_total").absolute(models.evictions);
            for device in devices {
                let backend = device.kind().as_str();
                // Device time of all tenants; per-tenant figures are in
                // GET /v1/usage (tenants are unbounded, backends are three).
                gauge!("gust_gpu_busy_seconds", "backend" => backend)
                    .set(device.busy_time().as_secs_f64());
                gauge!("gust_gpu_memory_bytes", "backend" => backend)
                    .set(device.used_bytes() as f64);
            }
        });
        self.handle.render()
    }
}
