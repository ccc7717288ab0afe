//! [`Metrics`]: the Prometheus metrics `/metrics` serves, in the OpenMetrics
//! text format (prometheus-client), which Prometheus scrapes natively.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a per-projection metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabel {
    /// The projection's name.
    pub projection: String,
}

/// Labels of a per-partition metric: the projection and the source
/// partition (`kafka:<source>/<topic>/<n>`, say).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// The projection's name.
    pub projection: String,
    /// The partition, as checkpoints name it.
    pub partition: String,
}

/// Labels of a guest error: the projection and the kind (`retry`,
/// `reject`, `trap`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuestErrorLabel {
    /// The projection's name.
    pub projection: String,
    /// `retry`, `reject` or `trap`.
    pub kind: String,
}

/// Every metric of one host.
pub struct Metrics {
    registry: Registry,
    /// Events handed to a module and committed.
    pub events_processed: Family<ProjectionLabel, Counter>,
    /// Log head minus checkpoint, refreshed at each scrape.
    pub lag: Family<ProjectionLabel, Gauge>,
    /// Wall-clock time of one batch's transaction.
    pub batch_seconds: Histogram,
    /// Events parked as dead letters, refreshed at each scrape.
    pub dead_letters: Family<ProjectionLabel, Gauge>,
    /// Modules swapped in while running (a rebuild's takeover is not one).
    pub module_swaps: Family<ProjectionLabel, Counter>,
    /// Rebuilds that caught up and took over while running.
    pub rebuilds: Family<ProjectionLabel, Counter>,
    /// Failed guest calls by kind.
    pub guest_errors: Family<GuestErrorLabel, Counter>,
    /// The source's last position, refreshed at each scrape.
    pub source_head: Family<ProjectionLabel, Gauge>,
    /// 1 while the projection's source answers, 0 while connecting.
    pub source_connected: Family<ProjectionLabel, Gauge>,
    /// For a source of several partitions, each partition's checkpoint,
    /// head and lag, as the host last reported them.
    pub partition_position: Family<PartitionLabel, Gauge>,
    /// See `partition_position`.
    pub partition_head: Family<PartitionLabel, Gauge>,
    /// See `partition_position`.
    pub partition_lag: Family<PartitionLabel, Gauge>,
    /// Events emitted into the outbox by committed batches.
    pub events_emitted: Family<ProjectionLabel, Counter>,
    /// Outbox events handed to the event log (appended, or found there
    /// already from a publish cut short) and removed from the outbox.
    pub events_published: Family<ProjectionLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let events_processed = Family::<ProjectionLabel, Counter>::default();
        let lag = Family::<ProjectionLabel, Gauge>::default();
        let batch_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let dead_letters = Family::<ProjectionLabel, Gauge>::default();
        let module_swaps = Family::<ProjectionLabel, Counter>::default();
        let guest_errors = Family::<GuestErrorLabel, Counter>::default();
        let rebuilds = Family::<ProjectionLabel, Counter>::default();
        let source_head = Family::<ProjectionLabel, Gauge>::default();
        let source_connected = Family::<ProjectionLabel, Gauge>::default();
        let events_emitted = Family::<ProjectionLabel, Counter>::default();
        let partition_position = Family::<PartitionLabel, Gauge>::default();
        let partition_head = Family::<PartitionLabel, Gauge>::default();
        let partition_lag = Family::<PartitionLabel, Gauge>::default();
        let events_published = Family::<ProjectionLabel, Counter>::default();
        registry.register(
            "projector_source_head",
            "The last position of the projection's source",
            source_head.clone(),
        );
        registry.register(
            "projector_source_connected",
            "1 while the projection's source answers, 0 while it is connecting",
            source_connected.clone(),
        );
        registry.register(
            "projector_partition_position",
            "For a source of several partitions: where the projection's checkpoint is in each",
            partition_position.clone(),
        );
        registry.register(
            "projector_partition_head",
            "For a source of several partitions: the last position of each (a Kafka high watermark)",
            partition_head.clone(),
        );
        registry.register(
            "projector_partition_lag",
            "For a source of several partitions: records of each after the projection's checkpoint",
            partition_lag.clone(),
        );
        registry.register(
            "projector_events_processed",
            "Events handed to a projection's module and committed",
            events_processed.clone(),
        );
        registry.register(
            "projector_lag",
            "Events of the projection's source after its checkpoint (for a broker, as the broker counts them)",
            lag.clone(),
        );
        registry.register(
            "projector_batch_seconds",
            "Time to handle and commit one batch",
            batch_seconds.clone(),
        );
        registry.register(
            "projector_events_emitted",
            "Events a projection emitted into its outbox, in batches that committed",
            events_emitted.clone(),
        );
        registry.register(
            "projector_events_published",
            "Events taken from a projection's outbox and published to the event log",
            events_published.clone(),
        );
        registry.register("projector_dead_letters", "Events parked as dead letters", dead_letters.clone());
        registry.register("projector_module_swaps", "Modules swapped in while running", module_swaps.clone());
        registry.register("projector_rebuilds", "Rebuilds that took over while running", rebuilds.clone());
        registry.register(
            "projector_guest_errors",
            "Failed guest calls by kind (retry, reject, trap); a failing batch split to find its event counts once",
            guest_errors.clone(),
        );
        Metrics {
            registry,
            events_processed,
            lag,
            source_head,
            source_connected,
            batch_seconds,
            dead_letters,
            module_swaps,
            rebuilds,
            guest_errors,
            partition_position,
            partition_head,
            partition_lag,
            events_emitted,
            events_published,
        }
    }
}

impl Metrics {
    /// The label of projection `name`.
    pub fn label(name: &str) -> ProjectionLabel {
        ProjectionLabel { projection: name.to_string() }
    }

    /// Count a failed guest call of `kind` for `projection`.
    pub fn guest_error(&self, projection: &str, kind: &str) {
        self.guest_errors
            .get_or_create(&GuestErrorLabel { projection: projection.to_string(), kind: kind.to_string() })
            .inc();
    }

    /// Everything, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
