//! The agent's recent log lines, kept in memory for `overlay-ctl agent logs [-f]`: a
//! bounded ring of formatted lines plus a broadcast channel that followers subscribe to.
//! It plugs into `tracing_subscriber` as a writer, so it sees exactly what stderr sees.
use std::{
    collections::VecDeque,
    io,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

/// How many lines `agent logs` can show without `-f`.
pub const DEFAULT_CAPACITY: usize = 2_000;

#[derive(Clone)]
pub struct LogBuffer {
    inner: Arc<Inner>,
}

struct Inner {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
    live: broadcast::Sender<String>,
}

impl LogBuffer {
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                lines: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
                capacity: capacity.max(1),
                live,
            }),
        }
    }

    /// Adds one line (without its newline).
    pub fn push(&self, line: String) {
        let mut lines = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == self.inner.capacity {
            lines.pop_front();
        }
        lines.push_back(line.clone());
        // Nobody following is fine.
        let _ = self.inner.live.send(line);
    }

    /// The last `n` lines, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let lines = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last `n` lines and a receiver of every line after them, with no gap between.
    pub fn follow(&self, n: usize) -> (Vec<String>, broadcast::Receiver<String>) {
        let lines = self.inner.lines.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = self.inner.live.subscribe();
        let recent = lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect();
        (recent, receiver)
    }
}

impl Default for LogBuffer {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// One formatted event; tracing-subscriber writes an event in one or more pieces and then
/// drops the writer, which is when the line is complete.
pub struct LineWriter {
    buffer: LogBuffer,
    pending: Vec<u8>,
}

impl io::Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.pending);
        for line in text.lines().filter(|l| !l.is_empty()) {
            self.buffer.push(line.to_string());
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            buffer: self.clone(),
            pending: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_lines() {
        let buffer = LogBuffer::new(3);
        for i in 0..5 {
            buffer.push(format!("line {i}"));
        }
        assert_eq!(buffer.recent(10), ["line 2", "line 3", "line 4"]);
        assert_eq!(buffer.recent(1), ["line 4"]);
    }

    #[test]
    fn followers_see_lines_after_the_snapshot() {
        let buffer = LogBuffer::new(10);
        buffer.push("before".into());
        let (recent, mut live) = buffer.follow(10);
        assert_eq!(recent, ["before"]);
        buffer.push("after".into());
        assert_eq!(live.try_recv().unwrap(), "after");
    }

    #[test]
    fn writer_splits_events_into_lines() {
        use std::io::Write as _;
        use tracing_subscriber::fmt::MakeWriter as _;
        let buffer = LogBuffer::new(10);
        {
            let mut w = buffer.make_writer();
            w.write_all(b"first\nsec").unwrap();
            w.write_all(b"ond\n").unwrap();
        }
        assert_eq!(buffer.recent(10), ["first", "second"]);
    }
}
