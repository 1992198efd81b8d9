//! The report in the Prometheus text format (OpenMetrics), family by
//! family in the order of [`FAMILIES`], whose names, kinds, units and
//! help it takes.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::{FunctionReport, Report};
use crate::metrics::{FAMILIES, Family, Kind};

/// The report in the Prometheus text format (OpenMetrics).
pub fn prometheus(report: Report) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Exporter(report)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

/// The content type of [`prometheus`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One sample of a family: its labels' values (in the order of
/// [`Family::labels`]) and its value.
type Sample = (Vec<String>, f64);

/// A report as a Prometheus collector.
#[derive(Debug)]
struct Exporter(Report);

impl Collector for Exporter {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in FAMILIES {
            let samples = samples(&self.0, family);
            if samples.is_empty() {
                continue;
            }
            let unit = family.unit.map(|u| match u {
                "seconds" => Unit::Seconds,
                "bytes" => Unit::Bytes,
                other => Unit::Other(other.to_owned()),
            });
            let kind = match family.kind {
                Kind::Counter => ConstCounter::new(0u64).metric_type(),
                Kind::Gauge => ConstGauge::new(0.0f64).metric_type(),
            };
            let mut m = e.encode_descriptor(family.name, family.help, unit.as_ref(), kind)?;
            if family.labels.is_empty() {
                encode(family.kind, samples[0].1, m)?;
                continue;
            }
            for (values, v) in samples {
                let labels: Vec<(&str, &str)> = family
                    .labels
                    .iter()
                    .copied()
                    .zip(values.iter().map(String::as_str))
                    .collect();
                encode(family.kind, v, m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// One sample's value, as its kind is written.
fn encode(kind: Kind, v: f64, m: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    match kind {
        Kind::Counter => ConstCounter::new(v as u64).encode(m),
        Kind::Gauge => ConstGauge::new(v).encode(m),
    }
}

/// The samples of `family` in `report`: from the gateway's counters where
/// they feed it, else from the report's other figures.
fn samples(report: &Report, family: &Family) -> Vec<Sample> {
    let g = &report.gateway;
    let fed: Vec<Sample> = g
        .counters
        .values()
        .filter(|(c, _)| c.family == family.name)
        .map(|(c, v)| {
            (
                c.label.map(|(_, l)| l.to_owned()).into_iter().collect(),
                v as f64,
            )
        })
        .collect();
    if !fed.is_empty() {
        return fed;
    }
    let one = |v: f64| vec![(Vec::new(), v)];
    let quantiles = |p: crate::metrics::Percentiles, mut labels: Vec<String>| {
        [("0.5", p.p50_ms), ("0.95", p.p95_ms), ("0.99", p.p99_ms)]
            .into_iter()
            .map(|(q, ms)| {
                labels.push(q.to_owned());
                let l = labels.clone();
                labels.pop();
                (l, ms / 1000.0)
            })
            .collect::<Vec<_>>()
    };
    let fs = &report.functions;
    let each = |v: &dyn Fn(&FunctionReport) -> u64| -> Vec<Sample> {
        fs.iter()
            .map(|f| (vec![f.name.clone()], v(f) as f64))
            .collect()
    };
    match family.name {
        "edgefn_info" => vec![(vec![g.id.clone(), g.edgefn_version.clone()], 1.0)],
        "edgefn_uptime" => one(g.uptime_s as f64),
        "edgefn_buffer_records" => one(g.buffer_records as f64),
        "edgefn_buffer" => one(g.buffer_bytes as f64),
        "edgefn_buffer_oldest_record_age" => one(g.oldest_record_age_s.unwrap_or(0.0)),
        "edgefn_upstream_connected" => one(f64::from(u8::from(g.upstream_connected))),
        "edgefn_commit_duration" => g
            .commit_latency
            .map(|p| quantiles(p, Vec::new()))
            .unwrap_or_default(),
        "edgefn_disk_written" => g
            .disk_write_bytes
            .map(|d| one(d as f64))
            .unwrap_or_default(),
        "edgefn_disk_bytes_per_message" => g.disk_bytes_per_message.map(one).unwrap_or_default(),
        "edgefn_disk_bytes_per_day" => g.disk_bytes_per_day.map(one).unwrap_or_default(),
        "edgefn_function_info" => fs
            .iter()
            .map(|f| {
                (
                    vec![f.name.clone(), f.version.to_string(), f.origin.clone()],
                    1.0,
                )
            })
            .collect(),
        "edgefn_invocations" => fs
            .iter()
            .flat_map(|f| {
                std::iter::once(("ok", f.succeeded))
                    .chain(f.errors.iter().map(|(k, n)| (k.as_str(), *n)))
                    .map(|(outcome, n)| (vec![f.name.clone(), outcome.to_owned()], n as f64))
            })
            .collect(),
        "edgefn_retries" => each(&|f| f.retries),
        "edgefn_function_dead_letters" => each(&|f| f.dead_letters),
        "edgefn_throttles" => each(&|f| f.throttles),
        "edgefn_emitted_records" => each(&|f| f.emitted_records),
        "edgefn_emitted" => each(&|f| f.emitted_bytes),
        "edgefn_published" => each(&|f| f.published),
        "edgefn_calls_refused" => fs
            .iter()
            .flat_map(|f| {
                [
                    ("emit", f.emit_denied),
                    ("publish", f.publish_denied),
                    ("state_set", f.state_refused),
                ]
                .map(|(call, n)| (vec![f.name.clone(), call.to_owned()], n as f64))
            })
            .collect(),
        "edgefn_state" => each(&|f| f.state_bytes),
        "edgefn_schedule_skipped" => each(&|f| f.schedule_skipped),
        "edgefn_invocation_duration" => fs
            .iter()
            .filter_map(|f| f.duration.map(|p| quantiles(p, vec![f.name.clone()])))
            .flatten()
            .collect(),
        other => unreachable!("no samples for the metric family {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{COUNTERS, Percentiles};
    use crate::telemetry::GatewayReport;

    /// A report with every figure present: one function, which failed.
    fn full_report() -> Report {
        let p = Percentiles {
            p50_ms: 1.0,
            p95_ms: 2.0,
            p99_ms: 3.0,
            samples: 3,
        };
        Report {
            gateway: GatewayReport {
                id: "pi-01".into(),
                edgefn_version: "0.1.0".into(),
                at_ms: 1,
                uptime_s: 2,
                counters: Default::default(),
                buffer_records: 3,
                buffer_bytes: 4,
                oldest_record_age_s: Some(5.0),
                upstream_connected: true,
                commit_latency: Some(p),
                disk_write_bytes: Some(6),
                disk_bytes_per_message: Some(7.0),
                disk_bytes_per_day: Some(8.0),
                disk_window_s: Some(9.0),
            },
            functions: vec![FunctionReport {
                name: "clean".into(),
                version: 1,
                origin: "config".into(),
                invocations: 2,
                succeeded: 1,
                errors: [("timeout".to_owned(), 1)].into(),
                retries: 1,
                dead_letters: 1,
                throttles: 0,
                emitted_records: 1,
                emitted_bytes: 10,
                published: 0,
                emit_denied: 0,
                publish_denied: 0,
                state_bytes: 0,
                state_refused: 0,
                schedule_skipped: 0,
                duration: Some(p),
            }],
        }
    }

    #[test]
    fn the_text_has_every_family_of_the_table_and_no_other() {
        let text = prometheus(full_report());
        let written: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                (name.to_owned(), kind.to_owned())
            })
            .collect();
        let table: Vec<(String, String)> = FAMILIES
            .iter()
            .map(|f| {
                let name = f.full_name();
                let kind = match f.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                (name.trim_end_matches("_total").to_owned(), kind.to_owned())
            })
            .collect();
        assert_eq!(written, table);
        for f in FAMILIES.iter().filter(|f| f.unit.is_some()) {
            let name = f.full_name();
            let family = name.trim_end_matches("_total");
            assert!(
                text.contains(&format!("# UNIT {family} {}", f.unit.unwrap())),
                "{text}"
            );
        }
    }

    #[test]
    fn each_counter_is_the_sample_of_its_family_and_label() {
        for (i, c) in COUNTERS.iter().enumerate() {
            let mut report = full_report();
            // Only this counter is non-zero.
            let mut json = serde_json::to_value(report.gateway.counters).unwrap();
            json[c.field] = 4242.into();
            report.gateway.counters = serde_json::from_value(json).unwrap();
            let text = prometheus(report);
            let family = crate::metrics::find(c.family).unwrap();
            let name = family.full_name();
            let value = match family.kind {
                Kind::Counter => "4242",
                Kind::Gauge => "4242.0",
            };
            let sample = match c.label {
                Some((label, l)) => format!("{name}{{{label}=\"{l}\"}} {value}"),
                None => format!("{name} {value}"),
            };
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(" 4242")).collect();
            assert_eq!(lines, [sample.as_str()], "counter {i} ({})", c.field);
        }
    }
}
