//! Reading and writing frames on an async byte stream, with the timeouts a
//! hub needs against slow or hostile peers.
//!
//! [`FrameReader`] owns a bounded buffer (never more than one maximum frame:
//! header plus the codec's data limit) and enforces two deadlines:
//!
//! - **idle**: how long to wait for the *first byte* of the next frame;
//! - **stall**: how long a frame may take to arrive *in full*, measured from
//!   the arrival of its first byte. A peer that starts a frame and then
//!   trickles a byte now and then is still cut off when the stall time is up.
//!
//! Time is tokio time, so tests can run under `tokio::time::pause()`.
//! [`write_frame`] is the matching writer.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::frame::{ByteOrder, Frame, FrameCodec, FrameError, Header, needed_len};

/// Bytes asked of the stream per read when the current frame needs less: a
/// few small frames can arrive in one read without growing the buffer past
/// one maximum frame.
const READ_CHUNK: usize = 4096;
/// How much is read at once while no frame has started.
const IDLE_CHUNK: usize = 256;

/// Reads frames from `R` through a [`FrameCodec`], with idle and stall
/// timeouts and a buffer bounded by the codec's maximum frame length.
#[derive(Debug)]
pub struct FrameReader<R> {
    /// The byte stream (typically a TLS stream, or its read half).
    reader: R,
    /// Bytes read but not yet returned as frames. Never longer than
    /// `codec.max_frame_len()`: reads are sized so that they cannot overshoot
    /// the frame being assembled by more than that bound allows.
    buf: BytesMut,
    /// Decodes the buffer and enforces the link's maximum data length.
    codec: FrameCodec,
    /// When the first byte of the frame now in `buf` arrived; `None` while
    /// `buf` is empty. The stall deadline is counted from here, not from the
    /// last read, so trickling bytes does not extend it.
    frame_started: Option<Instant>,
    /// When the last read returned bytes: the arrival time of any bytes of
    /// the next frame left over after a frame is decoded.
    last_read_at: Instant,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of frames from `reader`, decoding with `codec`.
    pub fn new(reader: R, codec: FrameCodec) -> Self {
        FrameReader {
            reader,
            buf: BytesMut::new(),
            codec,
            frame_started: None,
            last_read_at: Instant::now(),
        }
    }

    /// Reads the next frame.
    ///
    /// - `Ok(Some(frame))`: a complete frame (unknown versions and codes
    ///   included: answering those is the caller's job).
    /// - `Ok(None)`: the stream ended cleanly, between frames.
    /// - `Err(ReadError::Idle(idle))`: no byte of a new frame arrived within
    ///   `idle` of this call (`None` waits for ever).
    /// - `Err(ReadError::Stalled { .. })`: a frame had started but was not
    ///   complete `stall` after its first byte arrived.
    /// - `Err(ReadError::Frame(..))`: the header declared too much data
    ///   ([`FrameError::DataTooLong`]), the stream ended mid-frame
    ///   ([`FrameError::Truncated`]), or an I/O error.
    ///
    /// After an error the stream is not in a usable state; close it (after
    /// sending a NACK where the protocol says so).
    ///
    /// Cancel safety: dropping the future loses no data; bytes already read
    /// stay buffered, and the stall deadline of a started frame still counts
    /// from its first byte. The idle deadline restarts with each call.
    pub async fn read_frame(
        &mut self,
        idle: Option<Duration>,
        stall: Duration,
    ) -> Result<Option<Frame>, ReadError> {
        let idle_deadline = idle.map(|d| Instant::now() + d);
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                self.frame_started = if self.buf.is_empty() {
                    None
                } else {
                    // The next frame's first bytes came with the last read.
                    Some(self.last_read_at)
                };
                return Ok(Some(frame));
            }

            let deadline = match self.frame_started {
                Some(started) => {
                    let deadline = started + stall;
                    if Instant::now() >= deadline {
                        return Err(self.stalled(stall));
                    }
                    Some(deadline)
                }
                None => idle_deadline,
            };

            let need = needed_len(&self.buf, self.codec.v0_byte_order());
            // `decode` returned None, so the buffer holds less than one frame
            // of at most `max_frame_len` bytes: `room` is at least one.
            let room = self.codec.max_frame_len().saturating_sub(self.buf.len());
            let missing = need.saturating_sub(self.buf.len());
            // Between frames (the usual state of an idle link) hold only a small
            // buffer: a link waits here most of its life, and thousands of links each
            // holding READ_CHUNK bytes cost more memory than the TLS state itself.
            let want = if self.buf.is_empty() {
                if self.buf.capacity() > IDLE_CHUNK {
                    self.buf = BytesMut::new();
                }
                missing.max(IDLE_CHUNK).min(room)
            } else {
                missing.max(READ_CHUNK).min(room)
            };
            self.buf.reserve(want);
            let mut limited = (&mut self.reader).take(want as u64);
            let read = limited.read_buf(&mut self.buf);
            let n = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(result) => result.map_err(FrameError::Io)?,
                    Err(_elapsed) => {
                        return Err(match self.frame_started {
                            Some(_) => self.stalled(stall),
                            None => ReadError::Idle(idle.unwrap_or_default()),
                        });
                    }
                },
                None => read.await.map_err(FrameError::Io)?,
            };

            if n == 0 {
                // End of stream: clean if between frames, else Truncated.
                return Ok(self.codec.decode_eof(&mut self.buf)?);
            }
            self.last_read_at = Instant::now();
            if self.frame_started.is_none() {
                self.frame_started = Some(self.last_read_at);
            }
        }
    }

    /// The next frame if it can be had without waiting: from the buffer, or from
    /// bytes the stream already holds. `None` means reading would have to wait.
    ///
    /// A server answers a burst of frames with one write: it handles the frames
    /// that are already here, queues their replies ([`FrameWriter::queue`]), and
    /// sends them before it waits for more. Cancel-safe like [`Self::read_frame`].
    pub fn read_ready(&mut self, stall: Duration) -> Option<Result<Option<Frame>, ReadError>> {
        let read = std::pin::pin!(self.read_frame(None, stall));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match read.poll(&mut cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        }
    }

    fn stalled(&self, after: Duration) -> ReadError {
        ReadError::Stalled {
            have: self.buf.len(),
            need: needed_len(&self.buf, self.codec.v0_byte_order()),
            after,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.reader
    }

    /// The underlying stream, mutably. Reading from it directly bypasses the
    /// buffer and desynchronises the frame stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.reader
    }

    /// The underlying stream; buffered bytes are lost.
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// How many bytes are buffered (read but not yet returned as a frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The header of the frame being received, if all 6 bytes of it have
    /// arrived. After [`FrameError::DataTooLong`] or [`ReadError::Stalled`]
    /// this tells the version and id to answer with (see
    /// [`Frame::protocol_nack`]).
    pub fn pending_header(&self) -> Option<Header> {
        Header::parse_with(&self.buf, self.codec.v0_byte_order())
    }
}

/// Encodes `frame`, writes it in full and flushes.
///
/// # Errors
///
/// An I/O error from the stream, or an error of kind
/// [`std::io::ErrorKind::InvalidInput`] wrapping [`FrameError::DataTooLong`]
/// (nothing is written then) if the frame's data is longer than 65535 bytes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    write_frame_with(w, frame, ByteOrder::Little).await
}

/// [`write_frame`] on a link whose version-0 frames use `v0_order` (see
/// [`ByteOrder`]).
///
/// # Errors
///
/// As [`write_frame`].
pub async fn write_frame_with<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    v0_order: ByteOrder,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(frame.encoded_len());
    frame
        .encode_with(&mut buf, v0_order)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// Why [`FrameReader::read_frame`] returned no frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No byte of a new frame arrived within the idle timeout.
    #[error("no frame started within the idle timeout of {0:?}")]
    Idle(Duration),
    /// A frame started but did not complete within the stall timeout,
    /// counted from its first byte.
    #[error(
        "peer stalled mid-frame: {have} of the frame's {need} bytes arrived within {after:?} of its first byte"
    )]
    Stalled {
        /// Bytes of the frame that had arrived (header included).
        have: usize,
        /// Bytes the frame needs (just the header length while the header
        /// is incomplete).
        need: usize,
        /// The stall timeout that ran out.
        after: Duration,
    },
    /// The byte stream is not a valid frame stream, or failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl ReadError {
    /// Whether this is a timeout (idle or stalled), as opposed to a bad or
    /// broken stream.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ReadError::Idle(_) | ReadError::Stalled { .. })
    }
}

/// Replies queued beyond this many bytes are sent before more are queued.
pub const QUEUE_MAX: usize = 16 * 1024;

/// A writer of frames that can hold replies back and send several in one write.
///
/// [`FrameWriter::queue`] encodes a frame into a small buffer without writing;
/// every write, flush or shutdown through the [`AsyncWrite`] impl (so
/// [`write_frame`] too) first sends what is queued, so frames always leave in
/// order. [`FrameWriter::send`] sends the queue. Nothing is allocated while
/// nothing is queued: an idle link holds no buffer.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    queued: BytesMut,
    v0_order: ByteOrder,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            queued: BytesMut::new(),
            v0_order: ByteOrder::Little,
        }
    }

    /// This writer for a link whose version-0 frames use `order` (see
    /// [`ByteOrder`]).
    pub fn with_v0_byte_order(self, order: ByteOrder) -> Self {
        FrameWriter {
            v0_order: order,
            ..self
        }
    }

    /// Queues `frame` and sends the queue: [`write_frame`] in this writer's
    /// byte order.
    ///
    /// # Errors
    ///
    /// An I/O error, or one of kind [`std::io::ErrorKind::InvalidInput`]
    /// wrapping [`FrameError::DataTooLong`] (nothing is queued then).
    pub async fn write(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.queue(frame)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.send().await
    }

    /// Encodes `frame` at the end of the queue. Returns true when the queue has
    /// reached [`QUEUE_MAX`] and should be sent now.
    ///
    /// # Errors
    ///
    /// [`FrameError::DataTooLong`] (nothing is queued).
    pub fn queue(&mut self, frame: &Frame) -> Result<bool, FrameError> {
        frame.encode_with(&mut self.queued, self.v0_order)?;
        Ok(self.queued.len() >= QUEUE_MAX)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Writes everything queued and flushes.
    ///
    /// # Errors
    ///
    /// An I/O error from the stream.
    pub async fn send(&mut self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *self).poll_flush(cx)).await
    }

    /// The wrapped stream (queued bytes are not written through it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn poll_drain(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        while !self.queued.is_empty() {
            match std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.queued) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    let _ = self.queued.split_to(n);
                }
            }
        }
        // Sent in full: give the memory back (an idle link keeps no buffer).
        self.queued = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FrameWriter<W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
