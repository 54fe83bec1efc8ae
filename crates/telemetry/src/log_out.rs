//! Where log lines go: file descriptor 2, each line in one `write(2)`, without a lock.
//!
//! `std::io::Stderr` takes a process-wide lock for every write. A thread that the scheduler
//! stops inside its `write` holds it, and every other thread with a line to write then sleeps
//! on it and must be woken: at a few thousand lines a second on two CPUs that was two futex
//! calls for every three lines. The lock buys nothing here, because the log layer hands each
//! line over in one piece and the kernel keeps one `write(2)` whole: on a file, lines never
//! overlap; on a pipe, a line of up to `PIPE_BUF` (4,096 bytes) arrives in one piece.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd as _;

/// Makes a writer per line for the log layer.
pub(crate) enum LogOut {
    /// A duplicate of descriptor 2, written to without a lock.
    Fd(File),
    /// Descriptor 2 could not be duplicated (it is closed): `Stderr`, which drops what is
    /// written to a closed descriptor.
    Std,
}

impl LogOut {
    pub(crate) fn stderr() -> LogOut {
        match io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => LogOut::Fd(File::from(fd)),
            Err(_) => LogOut::Std,
        }
    }
}

pub(crate) enum LineWriter<'a> {
    Fd(&'a File),
    Std(io::Stderr),
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LineWriter::Fd(f) => f.write(buf),
            LineWriter::Std(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            LineWriter::Fd(f) => f.write_all(buf),
            LineWriter::Std(s) => s.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogOut {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        match self {
            LogOut::Fd(f) => LineWriter::Fd(f),
            LogOut::Std => LineWriter::Std(io::stderr()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, Write as _};

    use tracing_subscriber::fmt::MakeWriter as _;

    use super::*;

    /// Lines written at once from many threads, none taking a lock, arrive whole and each
    /// once through a pipe (what a process manager or `journald` reads a service's stderr
    /// from).
    #[test]
    fn lines_from_many_threads_arrive_whole_through_a_pipe() {
        let (reader, writer) = io::pipe().unwrap();
        let out = LogOut::Fd(File::from(std::os::fd::OwnedFd::from(writer)));
        let lines_per_thread = 2_000;
        let read = std::thread::spawn(move || {
            io::BufReader::new(reader)
                .lines()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        });
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let out = &out;
                s.spawn(move || {
                    // Lines from 100 bytes up to PIPE_BUF, each of one repeated letter.
                    for i in 0..lines_per_thread {
                        let len = 100 + (i * 37 + usize::from(t) * 11) % 3_996;
                        let mut line = vec![b'a' + t; len - 1];
                        line.push(b'\n');
                        out.make_writer().write_all(&line).unwrap();
                    }
                });
            }
        });
        drop(out);
        let lines = read.join().unwrap();
        assert_eq!(lines.len(), 8 * lines_per_thread);
        for line in &lines {
            let first = line.as_bytes()[0];
            assert!(
                line.bytes().all(|b| b == first),
                "a line was interleaved with another: {} bytes",
                line.len()
            );
        }
    }
}
