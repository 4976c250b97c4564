//! The one writer every log line goes through: a bounded queue that a request's task pushes a
//! line to without a system call, and a thread that empties it into stdout on a timer.
//!
//! Why not tracing-appender's non-blocking writer, used at first: its thread sleeps in a
//! blocking receive, so a line sent while it sleeps wakes it — a futex call in the request's
//! task, two context switches and a `write(2)` per request at moderate rates, none of which an
//! instruction profile shows but which the benchmark's CPU per request did. Here the thread
//! wakes [`FLUSH_INTERVAL`] apart whatever the request rate and writes what it found in one
//! call; a line waits at most that long. A full queue drops the line and counts it: a slow log
//! reader must never slow the traffic.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long a line may wait in the queue.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Lines the queue holds (its slots, 256 KiB, are allocated up front); a burst beyond this
/// within one interval is dropped.
pub const QUEUE_LINES: usize = 8_192;

/// A batch is written once it holds this much, even mid-interval.
const BATCH_BYTES: usize = 64 * 1024;

/// The sending side: cheap to clone, shared by the access log and the tracing subscriber.
#[derive(Clone)]
pub struct LogWriter {
    queue: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl LogWriter {
    /// Queues one line (with its newline). Never blocks.
    pub fn write_line(&self, line: &[u8]) {
        if self.queue.try_send(line.to_vec()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far: queue full, writer gone, or stdout failing.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// What tracing-subscriber writes one formatted event into (in one `write_all`).
pub struct Line<'a>(&'a LogWriter);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

/// The writing thread. Dropping it writes what is queued and waits for the thread.
pub struct WriterThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// A queue of `capacity` lines: its sending side and what the writing thread drains.
fn queue(capacity: usize) -> (LogWriter, Receiver<Vec<u8>>) {
    let (queue, lines) = mpsc::sync_channel(capacity);
    let writer = LogWriter {
        queue,
        dropped: Arc::new(AtomicU64::new(0)),
    };
    (writer, lines)
}

/// Starts the thread writing into `out` (stdout in the proxy).
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(LogWriter, WriterThread)> {
    let (writer, lines) = queue(QUEUE_LINES);
    let stop = Arc::new(AtomicBool::new(false));
    let handle = thread::Builder::new().name("tandem-log".into()).spawn({
        let stop = stop.clone();
        let dropped = writer.dropped.clone();
        move || write_until_stopped(&lines, out, &stop, &dropped)
    })?;
    Ok((
        writer,
        WriterThread {
            stop,
            handle: Some(handle),
        },
    ))
}

fn write_until_stopped(
    lines: &Receiver<Vec<u8>>,
    mut out: impl Write,
    stop: &AtomicBool,
    dropped: &AtomicU64,
) {
    let mut batch = Batch::default();
    loop {
        // Read before draining: a line queued before the stop is still written.
        let mut stopping = stop.load(Ordering::Acquire);
        loop {
            match lines.try_recv() {
                Ok(line) => {
                    batch.push(&line);
                    if batch.bytes.len() >= BATCH_BYTES {
                        batch.write(&mut out, dropped);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stopping = true;
                    break;
                }
            }
        }
        batch.write(&mut out, dropped);
        if stopping {
            return;
        }
        // A timer, not a blocking receive: senders never have a sleeping receiver to wake.
        thread::park_timeout(FLUSH_INTERVAL);
    }
}

/// Lines gathered for one write.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl Batch {
    fn push(&mut self, line: &[u8]) {
        self.bytes.extend_from_slice(line);
        self.lines += 1;
    }

    fn write(&mut self, out: &mut impl Write, dropped: &AtomicU64) {
        if self.bytes.is_empty() {
            return;
        }
        if out
            .write_all(&self.bytes)
            .and_then(|()| out.flush())
            .is_err()
        {
            dropped.fetch_add(self.lines, Ordering::Relaxed);
        }
        self.bytes.clear();
        self.lines = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer the test can read back, counting the write calls it got.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock().unwrap();
            inner.0.extend_from_slice(buf);
            inner.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that always fails, as stdout does once its reader is gone.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_few_writes() {
        let captured = Captured::default();
        let (writer, thread) = spawn(captured.clone()).unwrap();
        let senders: Vec<_> = (0..4)
            .map(|n| {
                let writer = writer.clone();
                thread::spawn(move || {
                    for i in 0..500 {
                        writer.write_line(format!("{{\"t\":{n},\"i\":{i}}}\n").as_bytes());
                    }
                })
            })
            .collect();
        senders.into_iter().for_each(|s| s.join().unwrap());
        drop(thread); // writes what is queued
        let (bytes, writes) = captured.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2_000);
        assert!(writes < 2_000, "{writes} writes for 2,000 lines");
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (writer, lines) = queue(2); // nobody drains it
        for _ in 0..5 {
            writer.write_line(b"x\n");
        }
        assert_eq!(writer.dropped(), 3);
        assert_eq!(lines.try_iter().count(), 2);
    }

    #[test]
    fn lines_stdout_refuses_are_counted_as_dropped() {
        let (writer, thread) = spawn(Broken).unwrap();
        writer.write_line(b"a\n");
        writer.write_line(b"b\n");
        drop(thread);
        assert_eq!(writer.dropped(), 2);
    }

    #[test]
    fn a_line_sent_after_the_thread_is_gone_is_counted_not_lost_silently() {
        let (writer, thread) = spawn(Captured::default()).unwrap();
        drop(thread);
        writer.write_line(b"late\n");
        assert_eq!(writer.dropped(), 1);
    }
}
