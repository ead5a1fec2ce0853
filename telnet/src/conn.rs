//! Async telnet connection ([`TelnetConn`]) used by both the SCM server (Lines
//! mode) and the backoffice client (Raw mode): a `Framed` [`TelnetCodec`] plus a
//! [`Negotiator`] that answers the peer's negotiations automatically.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use crate::codec::{Event, Mode, Out, TelnetCodec, encode_out};
use crate::negotiate::Negotiator;

/// Errors of a [`TelnetConn`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// Reading or writing the underlying stream failed.
    #[error("telnet connection I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A telnet connection over any async byte stream.
#[derive(Debug)]
pub struct TelnetConn<S> {
    framed: Framed<S, TelnetCodec>,
    negotiator: Negotiator,
    /// An event whose negotiation reply is still being flushed.
    held: Option<Event>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TelnetConn<S> {
    /// Wraps `stream`, decoding in `mode`, with a refuse-everything negotiator.
    pub fn new(stream: S, mode: Mode) -> Self {
        Self {
            framed: Framed::new(stream, TelnetCodec::new(mode)),
            negotiator: Negotiator::new(),
            held: None,
        }
    }

    /// The negotiator (to allow options or inspect their state).
    pub fn negotiator_mut(&mut self) -> &mut Negotiator {
        &mut self.negotiator
    }

    /// The codec (to change mode).
    pub fn codec_mut(&mut self) -> &mut TelnetCodec {
        self.framed.codec_mut()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    /// The underlying stream; buffered unread input and unflushed output are lost.
    pub fn into_inner(self) -> S {
        self.framed.into_inner()
    }

    /// The next event, or `None` on end of stream (a partial line is dropped).
    ///
    /// A [`Event::Negotiate`] is answered through the negotiator (the reply, and
    /// anything queued with [`feed`](Self::feed), is flushed) and then returned.
    /// Cancel-safe: if cancelled while the reply is flushed, the next call
    /// finishes the flush and returns the event.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ConnError> {
        if self.held.is_none() {
            let Some(event) = self.framed.next().await.transpose()? else {
                return Ok(None);
            };
            if let Event::Negotiate { verb, option } = event
                && let Some(reply) = self.negotiator.received(verb, option)
            {
                encode_out(&reply, self.framed.write_buffer_mut());
            }
            self.held = Some(event);
        }
        if !self.framed.write_buffer().is_empty() {
            SinkExt::<Out>::flush(&mut self.framed).await?;
        }
        Ok(self.held.take())
    }

    /// Writes `out` and flushes.
    pub async fn send(&mut self, out: Out) -> Result<(), ConnError> {
        Ok(self.framed.send(out).await?)
    }

    /// Writes text (`\n` becomes CR LF) and flushes.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ConnError> {
        self.send(Out::Text(text.to_owned())).await
    }

    /// Writes `line` followed by CR LF and flushes.
    pub async fn send_line(&mut self, line: &str) -> Result<(), ConnError> {
        self.send(Out::Text(format!("{line}\r\n"))).await
    }

    /// Asks to enable/disable `option` on our side (WILL/WONT), if not already so.
    pub async fn request_us(&mut self, option: u8, enable: bool) -> Result<(), ConnError> {
        match self.negotiator.request_us(option, enable) {
            Some(out) => self.send(out).await,
            None => Ok(()),
        }
    }

    /// Asks the peer to enable/disable `option` (DO/DONT), if not already so.
    pub async fn request_him(&mut self, option: u8, enable: bool) -> Result<(), ConnError> {
        match self.negotiator.request_him(option, enable) {
            Some(out) => self.send(out).await,
            None => Ok(()),
        }
    }

    /// Queues `out` without flushing (it may still be written if the buffer is full).
    pub async fn feed(&mut self, out: Out) -> Result<(), ConnError> {
        Ok(self.framed.feed(out).await?)
    }

    /// Flushes everything queued, then shuts the stream's write side down: a TLS stream
    /// sends its close_notify, a TCP stream its FIN.
    pub async fn shutdown(&mut self) -> Result<(), ConnError> {
        SinkExt::<Out>::flush(&mut self.framed).await?;
        tokio::io::AsyncWriteExt::shutdown(self.framed.get_mut()).await?;
        Ok(())
    }

    /// Flushes everything queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        Ok(SinkExt::<Out>::flush(&mut self.framed).await?)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::codec::Verb;
    use crate::consts::IP;
    use crate::consts::opt::{ECHO, NAWS, TIMING_MARK};

    async fn next<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut TelnetConn<S>) -> Event {
        conn.next_event().await.expect("next_event").expect("event")
    }

    #[tokio::test]
    async fn server_lines_and_client_raw_over_duplex() {
        let (a, b) = tokio::io::duplex(4096);
        let mut server = TelnetConn::new(a, Mode::Lines);
        let mut client = TelnetConn::new(b, Mode::Raw);
        client.negotiator_mut().allow_him(ECHO, true);
        assert_eq!(server.codec_mut().mode(), Mode::Lines);

        // Unsolicited DO NAWS from the server is refused by the client.
        server.request_him(NAWS, true).await.expect("request");
        server.send_text("login: ").await.expect("send");
        assert_eq!(
            next(&mut client).await,
            Event::Negotiate {
                verb: Verb::Do,
                option: NAWS
            }
        );
        assert_eq!(
            next(&mut client).await,
            Event::Data(Bytes::from_static(b"login: "))
        );
        assert_eq!(
            next(&mut server).await,
            Event::Negotiate {
                verb: Verb::Wont,
                option: NAWS
            }
        );
        assert!(!server.negotiator_mut().him_enabled(NAWS));

        client.send_text("alice\n").await.expect("send");
        assert_eq!(next(&mut server).await, Event::Line(b"alice".to_vec()));

        server.request_us(ECHO, true).await.expect("request");
        server
            .request_us(ECHO, true)
            .await
            .expect("request again is a no-op");
        server.send_text("Password: ").await.expect("send");
        assert_eq!(
            next(&mut client).await,
            Event::Negotiate {
                verb: Verb::Will,
                option: ECHO
            }
        );
        assert!(client.negotiator_mut().him_enabled(ECHO));
        assert_eq!(
            next(&mut client).await,
            Event::Data(Bytes::from_static(b"Password: "))
        );
        assert_eq!(
            next(&mut server).await,
            Event::Negotiate {
                verb: Verb::Do,
                option: ECHO
            }
        );
        assert!(server.negotiator_mut().us_enabled(ECHO));

        // Batched output: a line, a bare CR and an 0xFF byte.
        client
            .feed(Out::Text("s3cret\r\n".into()))
            .await
            .expect("feed");
        client
            .feed(Out::Raw(Bytes::from_static(b"a\xff\r")))
            .await
            .expect("feed");
        client.flush().await.expect("flush");
        assert_eq!(next(&mut server).await, Event::Line(b"s3cret".to_vec()));
        assert_eq!(next(&mut server).await, Event::Line(b"a\xff".to_vec()));

        server.request_us(ECHO, false).await.expect("request");
        server.send_line("Welcome").await.expect("send");
        assert_eq!(
            next(&mut client).await,
            Event::Negotiate {
                verb: Verb::Wont,
                option: ECHO
            }
        );
        assert!(!client.negotiator_mut().him_enabled(ECHO));
        assert_eq!(
            next(&mut client).await,
            Event::Data(Bytes::from_static(b"Welcome\r\n"))
        );
        assert_eq!(
            next(&mut server).await,
            Event::Negotiate {
                verb: Verb::Dont,
                option: ECHO
            }
        );
        assert!(!server.negotiator_mut().us_enabled(ECHO));

        // Ctrl-C in inetutils telnet: IAC IP IAC DO TIMING-MARK must be answered.
        client.send(Out::Command(IP)).await.expect("send");
        client
            .send(Out::Negotiate(Verb::Do, TIMING_MARK))
            .await
            .expect("send");
        assert_eq!(next(&mut server).await, Event::Command(IP));
        assert_eq!(
            next(&mut server).await,
            Event::Negotiate {
                verb: Verb::Do,
                option: TIMING_MARK
            }
        );
        assert_eq!(
            next(&mut client).await,
            Event::Negotiate {
                verb: Verb::Wont,
                option: TIMING_MARK
            }
        );

        // A partial line at EOF is dropped; EOF is a clean None.
        client
            .send(Out::Raw(Bytes::from_static(b"half")))
            .await
            .expect("send");
        drop(client);
        assert!(server.next_event().await.expect("eof").is_none());
        let _stream: &tokio::io::DuplexStream = server.get_ref();
        let _stream = server.into_inner();
    }
}
