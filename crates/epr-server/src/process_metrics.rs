//! The standard Prometheus `process_*` metrics, read from `/proc/self` each time `/metrics`
//! is rendered (so they cost nothing between scrapes). On systems without `/proc` they are
//! left out.

use std::fmt::Write;

/// `/proc` reports CPU times in clock ticks of `USER_HZ`, which Linux fixes at 100 in its
/// user-space ABI on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where it is unavailable.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let mut s = Self::parse(&stat, &status, &boot)?;
        s.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        s.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| parse_max_fds(&l));
        Some(s)
    }

    /// Parses `/proc/self/stat`, `/proc/self/status` and `/proc/stat` (see proc(5)).
    pub fn parse(stat: &str, status: &str, proc_stat: &str) -> Option<Self> {
        // The command name (field 2) is in parentheses and may hold spaces or ')'.
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // `fields[0]` is field 3 (state), so field n is `fields[n - 3]`.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|k| k * 1024)
        };
        let boot_time = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
        Some(Self {
            cpu_seconds: (utime + stime) as f64 / TICKS_PER_SECOND,
            resident_bytes: kib("VmRSS:").unwrap_or(0),
            virtual_bytes: field(23).or_else(|| kib("VmSize:")).unwrap_or(0),
            start_time_seconds: boot_time as f64 + start_ticks as f64 / TICKS_PER_SECOND,
            open_fds: None,
            max_fds: None,
        })
    }

    /// Appends the metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
            );
        };
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds,
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes as f64,
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_bytes as f64,
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds,
        );
        if let Some(n) = self.open_fds {
            metric(
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                n as f64,
            );
        }
        if let Some(n) = self.max_fds {
            metric(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                n as f64,
            );
        }
    }
}

/// The soft limit of `Max open files` in `/proc/self/limits` (`unlimited` is left out).
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Appends the process metrics to a rendered exposition, when `/proc` is there.
pub fn append(out: &mut String) {
    if let Some(s) = ProcessStats::read() {
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        s.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let stat = "4242 (epr (x) y) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 130 0 0 20 0 \
                    9 0 123456 987654321 2500 18446744073709551615";
        let status = "Name:\tepr\nVmSize:\t  964520 kB\nVmRSS:\t   10000 kB\n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let s = ProcessStats::parse(stat, status, proc_stat).unwrap();
        assert_eq!(s.cpu_seconds, 3.8);
        assert_eq!(s.virtual_bytes, 987_654_321);
        assert_eq!(s.resident_bytes, 10_000 * 1024);
        assert_eq!(s.start_time_seconds, 1_700_000_000.0 + 1234.56);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(ProcessStats::parse("garbage", status, proc_stat), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read().expect("/proc/self is readable");
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
        assert!(s.open_fds.unwrap() >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0);
    }
}
