//! A batching log writer: formatted lines are appended to a shared buffer and a writer
//! thread writes the buffer out at most 20 ms after its first line (at once when it
//! holds 64 KiB).
//!
//! A writer thread woken per line (`tracing-appender`'s non-blocking writer) costs a
//! futex wake-up and a context switch per request; on two cores that took a third of
//! get-by-id throughput. Here a line costs a short lock and a copy, and the thread wakes
//! per batch. Nothing is dropped: when 8 MiB are waiting (the output is stuck), loggers
//! wait for the writer.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// A batch this large is written at once instead of at the next tick.
const FLUSH_AT: usize = 64 * 1024;
/// Loggers wait while this much is queued.
const MAX_QUEUED: usize = 8 * 1024 * 1024;
/// Longest a line waits in the buffer.
const TICK: Duration = Duration::from_millis(20);

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread (a full batch, or stop).
    wake: Condvar,
    /// Wakes loggers waiting for room.
    drained: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind; keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `MakeWriter` handed to the subscriber.
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

/// Stops the writer thread when dropped, after it wrote out everything queued.
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn batch_writer<W: Write + Send + 'static>(mut out: W) -> (BatchWriter, BatchGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        drained: Condvar::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("epr-log".into())
        .spawn(move || {
            let mut spare = Vec::with_capacity(FLUSH_AT);
            loop {
                let stop = {
                    // Idle: sleep until the first line. Then give the batch one tick to
                    // fill, unless it is full already.
                    let mut st = s
                        .wake
                        .wait_while(s.lock(), |st| st.buf.is_empty() && !st.stop)
                        .unwrap_or_else(|e| e.into_inner());
                    if st.buf.len() < FLUSH_AT && !st.stop {
                        st = s
                            .wake
                            .wait_timeout_while(st, TICK, |st| st.buf.len() < FLUSH_AT && !st.stop)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    std::mem::swap(&mut st.buf, &mut spare);
                    st.stop
                };
                if !spare.is_empty() {
                    s.drained.notify_all();
                    // Nowhere to report a failed log write: a batch that cannot be
                    // written (disk full, closed pipe) is dropped whole.
                    let _ = write_batch(&mut out, &spare);
                    spare.clear();
                    if spare.capacity() > 4 * FLUSH_AT {
                        spare.shrink_to(FLUSH_AT);
                    }
                } else if stop {
                    return;
                }
            }
        })
        .expect("the log writer thread starts");
    (
        BatchWriter(shared.clone()),
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    )
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's writer: appends to the shared buffer.
pub struct BatchLine<'a>(&'a Shared);

impl Write for BatchLine<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let shared = self.0;
        let mut st = shared.lock();
        if st.buf.len() >= MAX_QUEUED && !st.stop {
            st = shared
                .drained
                .wait_while(st, |st| st.buf.len() >= MAX_QUEUED && !st.stop)
                .unwrap_or_else(|e| e.into_inner());
        }
        let before = st.buf.len();
        st.buf.extend_from_slice(bytes);
        // Wake the writer when a batch starts and when it is full, not per line (a
        // wake-up is a syscall).
        if before == 0 || (before < FLUSH_AT && st.buf.len() >= FLUSH_AT) {
            shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        BatchLine(&self.0)
    }
}

/// Writes a whole batch. A non-blocking output (an inherited descriptor can be one) is
/// waited for up to a second instead of losing the batch, or half of it, at the first
/// `WouldBlock`.
fn write_batch(out: &mut impl Write, mut buf: &[u8]) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let mut waits = 0;
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && waits < 100 => {
                waits += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_whole_and_in_order_per_thread() {
        let sink = Sink::default();
        let (writer, guard) = batch_writer(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        w.make_writer()
                            .write_all(format!("t{t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard); // writes out the rest
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in out.lines() {
            let (t, i) = line.split_once(" line ").unwrap();
            let t: usize = t[1..].parse().unwrap();
            assert_eq!(i.parse::<usize>().unwrap(), next[t], "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn a_quiet_logger_is_written_within_a_tick() {
        let sink = Sink::default();
        let (writer, _guard) = batch_writer(sink.clone());
        writer.make_writer().write_all(b"one\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"one\n");
    }
}
