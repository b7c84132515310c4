//! The server's own view of a measurement window, from two scrapes of its `/metrics`:
//! group commits of the store's single writer and the relay's publish lag.

use crate::client::Conn;
use serde::Serialize;
use std::collections::HashMap;

/// One scrape: every sample line, keyed by its name with labels as printed.
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub async fn take(addr: &str) -> Option<Scrape> {
        let r = Conn::new(addr)
            .request("GET", "/metrics", None)
            .await
            .ok()?;
        if r.status != 200 {
            return None;
        }
        Some(Scrape::parse(&String::from_utf8_lossy(&r.body)))
    }

    fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// Sum of every series of `name` (any labels); `None` when the server has none.
    pub fn total(&self, name: &str) -> Option<f64> {
        let mut series = self.0.iter().filter(|(k, _)| {
            k.strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        });
        let first = series.next()?.1;
        Some(first + series.map(|(_, v)| v).sum::<f64>())
    }

    /// Cumulative bucket counts of histogram `name`, sorted by upper bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut b: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// What the server reports for a window (differences of two scrapes).
#[derive(Serialize, Clone, Debug, Default)]
pub struct ServerStats {
    /// Group commits of the store's writer (registrations and relay deletions alike).
    pub commits_per_s: f64,
    pub mean_group: f64,
    pub mean_commit_ms: f64,
    /// Share of the window the single writer thread spent in group commits (all of a
    /// group's work, fsync included). Group commit keeps the writer busy whenever
    /// anything waits, so near 1 only says it never idled; the group size says how much
    /// batching headroom is left.
    pub writer_busy: f64,
    /// Events the relay published (confirmed by NATS).
    pub events_published_per_s: f64,
    /// Event timestamp (ms resolution) → NATS confirmation, as the relay records it.
    pub publish_lag_mean_ms: Option<f64>,
    /// Upper bound of the histogram bucket holding the 99th percentile of that lag.
    pub publish_lag_p99_le_ms: Option<f64>,
}

impl ServerStats {
    pub fn between(a: &Scrape, b: &Scrape, seconds: f64) -> ServerStats {
        let d = |k: &str| b.get(k) - a.get(k);
        let commits = d("epr_store_commit_seconds_count");
        let groups = d("epr_store_commit_group_size_count");
        let lag_n = d("epr_events_publish_lag_seconds_count");
        let lag = "epr_events_publish_lag_seconds";
        let (ba, bb) = (a.buckets(lag), b.buckets(lag));
        let p99 = (lag_n > 0.0)
            .then(|| {
                bb.iter()
                    .map(|(le, c)| {
                        let before = ba.iter().find(|x| x.0 == *le).map_or(0.0, |x| x.1);
                        (*le, c - before)
                    })
                    .find(|(_, c)| *c >= 0.99 * lag_n)
                    .map(|(le, _)| le * 1000.0)
            })
            .flatten();
        ServerStats {
            commits_per_s: commits / seconds,
            mean_group: if groups > 0.0 {
                d("epr_store_commit_group_size_sum") / groups
            } else {
                0.0
            },
            mean_commit_ms: if commits > 0.0 {
                1000.0 * d("epr_store_commit_seconds_sum") / commits
            } else {
                0.0
            },
            writer_busy: d("epr_store_commit_seconds_sum") / seconds,
            events_published_per_s: d("epr_events_published_total") / seconds,
            publish_lag_mean_ms: (lag_n > 0.0)
                .then(|| 1000.0 * d("epr_events_publish_lag_seconds_sum") / lag_n),
            publish_lag_p99_le_ms: p99,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_of_two_scrapes() {
        let a = Scrape::parse(
            "# TYPE x histogram\nepr_store_commit_seconds_sum 1\nepr_store_commit_seconds_count 10\n\
             epr_store_commit_group_size_sum 100\nepr_store_commit_group_size_count 10\n\
             epr_events_published_total 5\n\
             epr_events_publish_lag_seconds_bucket{le=\"0.001\"} 1\n\
             epr_events_publish_lag_seconds_bucket{le=\"0.01\"} 5\n\
             epr_events_publish_lag_seconds_bucket{le=\"+Inf\"} 5\n\
             epr_events_publish_lag_seconds_sum 0.02\nepr_events_publish_lag_seconds_count 5\n",
        );
        let b = Scrape::parse(
            "epr_store_commit_seconds_sum 1.5\nepr_store_commit_seconds_count 110\n\
             epr_store_commit_group_size_sum 2100\nepr_store_commit_group_size_count 110\n\
             epr_events_published_total 2005\n\
             epr_events_publish_lag_seconds_bucket{le=\"0.001\"} 1001\n\
             epr_events_publish_lag_seconds_bucket{le=\"0.01\"} 1995\n\
             epr_events_publish_lag_seconds_bucket{le=\"+Inf\"} 2005\n\
             epr_events_publish_lag_seconds_sum 4.02\nepr_events_publish_lag_seconds_count 2005\n",
        );
        let s = ServerStats::between(&a, &b, 2.0);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(close(s.commits_per_s, 50.0));
        assert!(close(s.mean_group, 20.0));
        assert!(close(s.mean_commit_ms, 5.0));
        assert!(close(s.writer_busy, 0.25));
        assert!(close(s.events_published_per_s, 1000.0));
        assert!(close(s.publish_lag_mean_ms.unwrap(), 2.0));
        // 1990 of 2000 lags are ≤ 10 ms: the 99th percentile is in that bucket.
        assert!(close(s.publish_lag_p99_le_ms.unwrap(), 10.0));
    }

    #[test]
    fn totals_over_labels() {
        let s = Scrape::parse(
            "epr_x_total{app=\"a\"} 2\nepr_x_total{app=\"b\"} 3\nepr_x_total_other 7\nepr_y 1\n",
        );
        assert_eq!(s.total("epr_x_total"), Some(5.0));
        assert_eq!(s.total("epr_y"), Some(1.0));
        assert_eq!(s.total("epr_z"), None);
    }
}
