//! Where log lines go: file descriptor 2, each line in one `write(2)`, without a lock that
//! one thread can make the others sleep on.
//!
//! `std::io::Stderr` takes a process-wide lock for every write. A thread that the scheduler
//! stops inside its `write` holds it, and every other thread with a line to write then sleeps
//! on it and must be woken: at a few thousand lines a second on two CPUs that was two futex
//! calls for every three lines. For most lines that lock buys nothing: the log layer hands
//! each line over in one piece, and the kernel keeps one `write(2)` of up to `PIPE_BUF`
//! (4,096 bytes) whole on a pipe, and any write whole in a file (Linux 3.14 and later). So a
//! line up to that size is written under a shared lock, which threads take together without
//! waiting; a longer line, which the kernel may split on a pipe or finish in a second write,
//! takes the lock exclusively, so that no line of this process lands inside it.
//!
//! A line that cannot be written (a full non-blocking pipe, a reader gone) is dropped: the log
//! must not stop or fail the work it describes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd as _;
use std::sync::{PoisonError, RwLock};

/// The most bytes one `write(2)` to a pipe keeps whole (POSIX `PIPE_BUF` on Linux).
const PIPE_BUF: usize = 4096;

/// Makes a writer per line for the log layer.
pub(crate) struct LogOut {
    out: Out,
    /// Shared for a line the kernel keeps whole, exclusive for a longer one.
    long: RwLock<()>,
}

enum Out {
    /// A duplicate of descriptor 2.
    Fd(File),
    /// Descriptor 2 could not be duplicated (no descriptor was left): `Stderr` itself.
    Std,
}

impl LogOut {
    pub(crate) fn stderr() -> LogOut {
        let out = match io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => Out::Fd(File::from(fd)),
            Err(_) => Out::Std,
        };
        LogOut {
            out,
            long: RwLock::new(()),
        }
    }

    #[cfg(test)]
    fn to(file: File) -> LogOut {
        LogOut {
            out: Out::Fd(file),
            long: RwLock::new(()),
        }
    }

    fn write_line(&self, line: &[u8]) {
        let written = if line.len() <= PIPE_BUF {
            let _shared = self.long.read().unwrap_or_else(PoisonError::into_inner);
            self.write_all(line)
        } else {
            let _exclusive = self.long.write().unwrap_or_else(PoisonError::into_inner);
            self.write_all(line)
        };
        // Dropped: see the module's comment. (`tracing-subscriber` would report the error on
        // stderr, the same descriptor, and panic if that failed too.)
        let _ = written;
    }

    fn write_all(&self, line: &[u8]) -> io::Result<()> {
        match &self.out {
            Out::Fd(f) => (&*f).write_all(line),
            Out::Std => io::stderr().write_all(line),
        }
    }
}

/// What the log layer writes one line to.
pub(crate) struct LineWriter<'a>(&'a LogOut);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_line(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_line(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogOut {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead as _;

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Lines logged at once from many threads arrive whole and each once through a pipe (what
    /// a process manager or `journald` reads a service's stderr from): lines the kernel keeps
    /// whole, written without waiting on each other, and lines longer than `PIPE_BUF`, which
    /// it does not.
    #[test]
    fn lines_from_many_threads_arrive_whole_through_a_pipe() {
        let (reader, writer) = io::pipe().unwrap();
        let out = LogOut::to(File::from(std::os::fd::OwnedFd::from(writer)));
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_writer(out);
        let subscriber = std::sync::Arc::new(tracing_subscriber::registry().with(layer));
        let per_thread = 1_000;
        let read = std::thread::spawn(move || {
            io::BufReader::new(reader)
                .lines()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        });
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let subscriber = subscriber.clone();
                s.spawn(move || {
                    let _guard = tracing::subscriber::set_default(subscriber);
                    // From 100 bytes to 5 times PIPE_BUF, each line of one repeated letter.
                    for i in 0..per_thread {
                        let len = 100 + (i * 997 + usize::from(t) * 131) % (5 * PIPE_BUF);
                        let text = String::from(char::from(b'a' + t)).repeat(len);
                        tracing::info!("{text}");
                    }
                });
            }
        });
        drop(subscriber);
        let lines = read.join().unwrap();
        assert_eq!(lines.len(), 8 * per_thread);
        let mut long = 0;
        for line in &lines {
            let line = line.trim();
            let first = line.as_bytes()[0];
            assert!(
                line.bytes().all(|b| b == first),
                "a line was interleaved with another: {} bytes",
                line.len()
            );
            long += usize::from(line.len() > PIPE_BUF);
        }
        assert!(long > 1_000, "{long} lines longer than PIPE_BUF");
    }

    /// A line that cannot be written is dropped without an error: the reader is gone.
    #[test]
    fn a_line_nobody_reads_is_dropped_quietly() {
        let (reader, writer) = io::pipe().unwrap();
        drop(reader);
        let out = LogOut::to(File::from(std::os::fd::OwnedFd::from(writer)));
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&out);
        assert!(w.write_all(b"a line\n").is_ok());
        assert!(w.write_all(&vec![b'x'; 3 * PIPE_BUF]).is_ok());
    }
}
