//! Local sources: FIFO, character device, regular file, standard input.

use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std::pin::Pin;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std::task::{Context, Poll};
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use tokio::io::ReadBuf;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;

use super::line::LineAssembler;
use super::{READ_BUF, ReaderConfig, Retry, Session, Sink};

/// How a read loop ended.
#[derive(Debug)]
enum End {
    /// Shutdown, or the receiver is gone.
    Stop,
    /// End of input.
    Eof,
    /// A read failed.
    Error(io::Error),
}

/// Reads `r` into `asm` and sends the completed lines until EOF, error or stop.
async fn pump<R: AsyncRead + Unpin>(
    r: &mut R,
    asm: &mut LineAssembler,
    sink: &Sink,
    session: &mut Session,
) -> End {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = tokio::select! {
            _ = sink.shutdown.cancelled() => return End::Stop,
            r = r.read(&mut buf) => match r {
                Ok(0) => return End::Eof,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return End::Error(e),
            },
        };
        for line in asm.push(&buf[..n]) {
            if !sink.send(line).await {
                return End::Stop;
            }
            session.delivered = true;
        }
    }
}

/// `kind = "fifo"`: creates the FIFO if missing and reads it forever; writers come and go.
pub(super) async fn fifo(cfg: &ReaderConfig, what: &str, sink: &Sink, retry: Retry) {
    let Some(path) = cfg.path.as_deref() else {
        return;
    };
    reopening(path, what, "fifo", sink, retry, |p| {
        let rx = open_fifo(p)?;
        Ok(Box::new(rx) as Box<dyn AsyncRead + Unpin + Send>)
    })
    .await;
}

/// `kind = "device"`: reads a character device (or anything else that blocks), reopening
/// it after back-off on EOF or error.
pub(super) async fn device(cfg: &ReaderConfig, what: &str, sink: &Sink, retry: Retry) {
    let Some(path) = cfg.path.as_deref() else {
        return;
    };
    reopening(path, what, "device", sink, retry, |p| {
        let rx = open_device(p)?;
        Ok(Box::new(rx) as Box<dyn AsyncRead + Unpin + Send>)
    })
    .await;
}

/// The open-read-reopen loop shared by fifo and device.
async fn reopening(
    path: &Path,
    what: &str,
    noun: &str,
    sink: &Sink,
    mut retry: Retry,
    open: impl Fn(&Path) -> io::Result<Box<dyn AsyncRead + Unpin + Send>>,
) {
    let id = &sink.id;
    let shown = path.display();
    let mut asm = LineAssembler::new();
    let mut started = false;
    loop {
        if sink.stopping() {
            return;
        }
        let mut src = match open(path) {
            Ok(src) => src,
            Err(e) => {
                let d = retry.next_delay();
                tracing::error!(
                    "reader {id}: cannot open {noun} {shown}: {e}; retrying in {} ms",
                    d.as_millis()
                );
                if !sink.pause(d).await {
                    return;
                }
                continue;
            }
        };
        if started {
            tracing::info!("reader {id} reopened {noun} {shown}");
        } else {
            tracing::info!("reader {id} ({what}) started");
            started = true;
        }
        let mut session = Session::new();
        let end = pump(&mut src, &mut asm, sink, &mut session).await;
        drop(src);
        let partial = asm.discard();
        if partial > 0 {
            tracing::debug!("reader {id}: dropped an unterminated line ({partial} bytes)");
        }
        if session.healthy() {
            retry.reset();
        }
        let d = retry.next_delay();
        match end {
            End::Stop => return,
            End::Eof => tracing::warn!(
                "reader {id}: end of input on {noun} {shown}; reopening in {} ms",
                d.as_millis()
            ),
            End::Error(e) => tracing::error!(
                "reader {id}: reading {noun} {shown}: {e}; reopening in {} ms",
                d.as_millis()
            ),
        }
        if !sink.pause(d).await {
            return;
        }
    }
}

/// Creates the FIFO (mode 0600) if nothing is at `path`, then opens it for reading
/// without waiting for a writer and without seeing EOF when writers close.
fn open_fifo(path: &Path) -> io::Result<impl AsyncRead + Unpin + Send + 'static> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        Ok(_) => {
            return Err(io::Error::other(
                "something that is not a FIFO exists at this path (remove it, or fix the path)",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR) {
                Ok(()) => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                    tracing::debug!("created FIFO {}", path.display());
                }
                // Someone else made it first; the open below checks what it is.
                Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(io::Error::other(format!("mkfifo: {e}"))),
            }
        }
        Err(e) => return Err(e),
    }
    open_fifo_receiver(path)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn open_fifo_receiver(path: &Path) -> io::Result<pipe::Receiver> {
    // Opened read-write, we are a writer ourselves: no EOF when the last writer leaves.
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn open_fifo_receiver(path: &Path) -> io::Result<HeldFifo> {
    // No O_RDWR on FIFOs here: hold a write end of our own for as long as we read.
    let rx = pipe::OpenOptions::new().open_receiver(path)?;
    let tx = pipe::OpenOptions::new().open_sender(path)?;
    Ok(HeldFifo { rx, _tx: tx })
}

/// A FIFO's read end, plus a write end so the last writer leaving is not EOF.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[derive(Debug)]
struct HeldFifo {
    rx: pipe::Receiver,
    _tx: pipe::Sender,
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl AsyncRead for HeldFifo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

fn open_device(path: &Path) -> io::Result<pipe::Receiver> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() || meta.is_dir() {
        return Err(io::Error::other(
            "not a device (a regular file or directory would be re-read on every reopen; \
             use kind = \"file\" to replay recorded swipes)",
        ));
    }
    let flags = OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    // Read through the reactor (the pipe receiver is a plain non-blocking fd reader), so
    // that a pending read never ties up a thread and is dropped promptly on shutdown.
    pipe::Receiver::from_file_unchecked(file)
}

/// `kind = "file"`: reads the file once, then returns.
pub(super) async fn file(cfg: &ReaderConfig, what: &str, sink: &Sink) {
    let Some(path) = cfg.path.as_deref() else {
        return;
    };
    let id = &sink.id;
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("reader {id}: cannot open file {}: {e}", path.display());
            return;
        }
    };
    tracing::info!("reader {id} ({what}) started");
    to_end(&mut f, sink).await;
    tracing::info!("reader {id}: end of file {}", path.display());
}

/// `kind = "stdin"`: reads standard input until EOF, then returns.
pub(super) async fn stdin(what: &str, sink: &Sink) {
    tracing::info!("reader {} ({what}) started", sink.id);
    to_end(&mut tokio::io::stdin(), sink).await;
    tracing::info!("reader {}: end of standard input", sink.id);
}

/// Reads to EOF (an unterminated last line counts); an error is logged and ends the input.
async fn to_end<R: AsyncRead + Unpin>(r: &mut R, sink: &Sink) {
    let mut asm = LineAssembler::new();
    let mut session = Session::new();
    match pump(r, &mut asm, sink, &mut session).await {
        End::Stop => {}
        End::Eof => {
            // The input ended cleanly: an unterminated last line is a whole line.
            if let Some(line) = asm.finish() {
                sink.send(line).await;
            }
        }
        // A line cut short by an error is dropped: it could look like a shorter card.
        End::Error(e) => tracing::error!(
            "reader {}: read error: {e} (input ends; {} bytes of an unterminated line dropped)",
            sink.id,
            asm.discard()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::super::test_log::Logs;
    use super::super::{RawLine, ReaderKind, run};
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn start(
        kind: ReaderKind,
        path: &Path,
    ) -> (
        mpsc::Receiver<RawLine>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let mut cfg = ReaderConfig::new("r1", kind);
        cfg.path = Some(path.to_owned());
        let (tx, rx) = mpsc::channel(4);
        let token = CancellationToken::new();
        let ms = Duration::from_millis;
        let task = tokio::spawn(run(cfg, tx, token.clone(), ms(1), ms(20)));
        (rx, token, task)
    }

    async fn recv(rx: &mut mpsc::Receiver<RawLine>) -> String {
        let l = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("timed out waiting for a line")
            .expect("reader ended");
        assert_eq!(l.reader, "r1");
        assert!(!l.too_long);
        assert!(l.at_unix_ms > 1_600_000_000_000);
        String::from_utf8(l.line).unwrap()
    }

    async fn stop(token: CancellationToken, task: tokio::task::JoinHandle<()>) {
        token.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("run did not return on shutdown")
            .expect("run panicked");
    }

    #[tokio::test]
    async fn fifo_created_and_successive_writers() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swipes");
        let (mut rx, token, task) = start(ReaderKind::Fifo, &path);
        logs.wait_for(&format!("reader r1 (fifo {}) started", path.display()))
            .await;
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // Successive writers, each gone before the next comes: the reader must neither
        // see EOF when one leaves nor be absent (a non-blocking open for writing fails
        // unless a reader has the FIFO open) when the next arrives.
        for (data, want) in [
            (&b"111\n"[..], "111"),
            (b"222\r\n", "222"),
            (b"\n\r\n333\r", "333"),
        ] {
            let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
            w.write_all(data).await.unwrap();
            drop(w);
            assert_eq!(recv(&mut rx).await, want);
            // The reader task runs on this thread; it has already seen the writer leave.
            assert!(
                !logs.contents().contains("end of input"),
                "{}",
                logs.contents()
            );
        }
        stop(token, task).await;
        assert!(!logs.contents().contains("reopened"));
        assert!(!logs.contents().contains("111"));
    }

    #[tokio::test]
    async fn fifo_path_taken_by_regular_file() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swipes");
        std::fs::write(&path, "12345\n").unwrap();
        let (mut rx, token, task) = start(ReaderKind::Fifo, &path);
        logs.wait_for("ERROR").await;
        logs.wait_for("is not a FIFO").await;
        // Retried after back-off: logged again.
        logs.wait_until(|s| s.matches("cannot open fifo").count() >= 2)
            .await;
        assert!(!logs.contents().contains("started"));
        assert!(rx.try_recv().is_err());
        assert!(!task.is_finished());
        stop(token, task).await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "12345\n");
    }

    #[tokio::test]
    async fn fifo_missing_directory_is_retried_then_works() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("later");
        let path = sub.join("swipes");
        let (mut rx, token, task) = start(ReaderKind::Fifo, &path);
        logs.wait_for("cannot open fifo").await;
        std::fs::create_dir(&sub).unwrap();
        logs.wait_for("started").await;
        let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
        w.write_all(b"4242\n").await.unwrap();
        assert_eq!(recv(&mut rx).await, "4242");
        stop(token, task).await;
    }

    #[tokio::test]
    async fn device_reopened_after_eof() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        // A FIFO stands in for a device: reads block, and the last writer leaving is EOF.
        let path = dir.path().join("tty");
        nix::unistd::mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        let (mut rx, token, task) = start(ReaderKind::Device, &path);
        logs.wait_for(&format!("reader r1 (device {}) started", path.display()))
            .await;
        for (i, card) in ["555", "666"].into_iter().enumerate() {
            if i > 0 {
                // The writer left: EOF, then the device is reopened after back-off.
                logs.wait_for("end of input on device").await;
                logs.wait_for("reopened device").await;
            }
            // Non-blocking open for writing fails unless the reader has it open.
            let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
            w.write_all(format!("{card}\r\n").as_bytes()).await.unwrap();
            assert_eq!(recv(&mut rx).await, card);
            drop(w);
        }
        logs.wait_for("end of input on device").await;
        stop(token, task).await;
    }

    #[tokio::test]
    async fn device_refuses_regular_file() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        std::fs::write(&path, "777\n").unwrap();
        let (mut rx, token, task) = start(ReaderKind::Device, &path);
        logs.wait_for("not a device").await;
        assert!(rx.try_recv().is_err());
        stop(token, task).await;
    }

    #[tokio::test]
    async fn file_exact_lines_then_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recorded.txt");
        let long = "9".repeat(300);
        std::fs::write(
            &path,
            format!("A1\rB2\nC3\r\n\r\nD4\n\n{long}\r\nE5\r\nlast"),
        )
        .unwrap();
        let (mut rx, _token, task) = start(ReaderKind::File, &path);
        let mut got = Vec::new();
        while let Some(l) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
            got.push(l);
        }
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        let text: Vec<(String, bool)> = got
            .iter()
            .map(|l| (String::from_utf8(l.line.clone()).unwrap(), l.too_long))
            .collect();
        let expect: Vec<(String, bool)> = [
            ("A1", false),
            ("B2", false),
            ("C3", false),
            ("D4", false),
            (&long[..256], true),
            ("E5", false),
            ("last", false),
        ]
        .iter()
        .map(|(s, t)| (s.to_string(), *t))
        .collect();
        assert_eq!(text, expect);
    }

    #[tokio::test]
    async fn file_missing_logs_and_returns() {
        let logs = Logs::new();
        let _g = logs.install();
        let dir = tempfile::tempdir().unwrap();
        let (mut rx, _token, task) = start(ReaderKind::File, &dir.path().join("nope"));
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        assert!(rx.recv().await.is_none());
        assert!(logs.contents().contains("cannot open file"));
    }

    #[tokio::test]
    async fn receiver_gone_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swipes");
        let logs = Logs::new();
        let _g = logs.install();
        let (rx, _token, task) = start(ReaderKind::Fifo, &path);
        logs.wait_for("started").await;
        drop(rx);
        let mut w = pipe::OpenOptions::new().open_sender(&path).unwrap();
        w.write_all(b"1\n").await.unwrap();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}
