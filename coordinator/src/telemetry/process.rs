//! The process's resident memory, CPU time and open file descriptors, read from `/proc` at each
//! scrape, under Prometheus's standard `process_*` names (what dashboards expect).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// (resident bytes, CPU seconds, open descriptors); `None` off Linux or when `/proc` is hidden.
fn read() -> Option<(i64, f64, i64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    Some((
        resident_pages * page as i64,
        (utime + stime) / ticks.max(1) as f64,
        fds,
    ))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((resident, cpu, fds)) = read() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(resident);
        gauge.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of the coordinator process",
            None,
            gauge.metric_type(),
        )?)?;
        let counter = ConstCounter::new(cpu);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time of the coordinator process",
            None,
            counter.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(fds);
        gauge.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors (one per client connection, plus files)",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}
