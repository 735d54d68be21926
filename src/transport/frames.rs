//! The peer's WebSocket frames, read as RFC 6455 has a server read them:
//! masked, control frames short and whole, fragments joined in order, no
//! extensions. tungstenite parses each header; this keeps the state between
//! frames.
//!
//! The point is what an idle socket holds. A `tokio_tungstenite` stream keeps
//! tungstenite's whole context, a read buffer and two waker proxies for every
//! socket, about 500 bytes, though most sockets are idle most of the time.
//! Here an idle socket keeps an empty buffer that owns no memory: bytes are
//! read onto the stack and kept only while a frame is incomplete, and a
//! message's payload leaves as a slice of what was read, without a copy.

use std::io::Cursor;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// Control frames a server sends.
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;
pub const CLOSE: u8 = 0x8;

/// Read onto the stack at once: many small frames in one system call.
const STACK_READ: usize = 4096;

/// One message from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Binary(Bytes),
    /// Text is not part of either protocol; its content is not kept.
    Text,
    /// Must be answered with a pong carrying the same payload.
    Ping(Bytes),
    Pong,
    /// The peer closes; the payload to echo in our close frame.
    Close(Bytes),
}

/// Why the peer's stream cannot be read on.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// A message over the size limit, refused from its header.
    TooBig,
    /// Frames no WebSocket client sends.
    Protocol(&'static str),
    /// The connection failed.
    Io,
}

/// What the reader keeps between frames.
#[derive(Default)]
pub struct Reader {
    /// Bytes read and not yet consumed; owns no memory while idle.
    buf: BytesMut,
    /// A fragmented message so far (rare, so boxed): whether it is text, and
    /// its payload.
    partial: Option<Box<(bool, BytesMut)>>,
}

/// What one parse found.
enum Parsed {
    Message(Incoming),
    /// A fragment was taken; parse again.
    Fragment,
    /// This many more bytes complete the next frame.
    Need(usize),
}

impl Reader {
    /// The next message, or `None` once the peer has closed its side. A
    /// message (or fragments) over `max` bytes is refused from its header.
    pub fn poll_next<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        mut io: R,
        max: usize,
    ) -> Poll<Option<Result<Incoming, ReadError>>> {
        loop {
            let need = match self.parse(max) {
                Ok(Parsed::Message(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(Parsed::Fragment) => continue,
                Ok(Parsed::Need(need)) => need,
                Err(error) => return Poll::Ready(Some(Err(error))),
            };
            let read = if need > STACK_READ {
                // A large frame is read in place, into room for all of it.
                self.buf.reserve(need);
                ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut io),
                    cx,
                    &mut self.buf
                ))
            } else {
                let mut stack = [0u8; STACK_READ];
                let mut read = ReadBuf::new(&mut stack);
                ready!(Pin::new(&mut io).poll_read(cx, &mut read)).map(|()| {
                    self.buf.extend_from_slice(read.filled());
                    read.filled().len()
                })
            };
            match read {
                Ok(0) => return Poll::Ready(None),
                Ok(_) => {}
                Err(_) => return Poll::Ready(Some(Err(ReadError::Io))),
            }
        }
    }

    fn parse(&mut self, max: usize) -> Result<Parsed, ReadError> {
        let mut cursor = Cursor::new(&self.buf[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(Parsed::Need(1)),
            Err(_) => return Err(ReadError::Protocol("reserved opcode")),
        };
        let head_len = cursor.position() as usize;
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let Some(mask) = header.mask else {
            return Err(ReadError::Protocol("unmasked frame from a client"));
        };
        let control = matches!(header.opcode, OpCode::Control(_));
        if control && (!header.is_final || len > 125) {
            return Err(ReadError::Protocol("fragmented or oversized control frame"));
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.1.len());
        let len = usize::try_from(len).map_err(|_| ReadError::TooBig)?;
        if !control && len.saturating_add(so_far) > max {
            return Err(ReadError::TooBig);
        }
        let total = head_len + len;
        if self.buf.len() < total {
            return Ok(Parsed::Need(total - self.buf.len()));
        }
        self.buf.advance(head_len);
        let mut payload = self.buf.split_to(len);
        if self.buf.is_empty() {
            // Whatever the payload does not share is given back.
            self.buf = BytesMut::new();
        }
        unmask(&mut payload, mask);
        let whole = |text, payload: BytesMut| {
            Parsed::Message(match text {
                true => Incoming::Text,
                false => Incoming::Binary(payload.freeze()),
            })
        };
        Ok(match header.opcode {
            OpCode::Control(Control::Ping) => Parsed::Message(Incoming::Ping(payload.freeze())),
            OpCode::Control(Control::Pong) => Parsed::Message(Incoming::Pong),
            OpCode::Control(Control::Close) => {
                Parsed::Message(Incoming::Close(close_reply(&payload)?))
            }
            OpCode::Data(Data::Continue) => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation with nothing to continue"));
                };
                partial.1.extend_from_slice(&payload);
                if !header.is_final {
                    self.partial = Some(partial);
                    return Ok(Parsed::Fragment);
                }
                let (text, message) = *partial;
                whole(text, message)
            }
            OpCode::Data(Data::Text | Data::Binary) if self.partial.is_some() => {
                return Err(ReadError::Protocol("a message began inside another"));
            }
            OpCode::Data(kind) => {
                let text = kind == Data::Text;
                if !header.is_final {
                    self.partial = Some(Box::new((text, payload)));
                    return Ok(Parsed::Fragment);
                }
                whole(text, payload)
            }
            OpCode::Control(Control::Reserved(_)) => {
                return Err(ReadError::Protocol("reserved opcode"))
            }
        })
    }
}

/// What to answer a peer's close frame with: its code when it is one an
/// endpoint may send, 1002 when it is not, nothing when it gave none.
fn close_reply(payload: &[u8]) -> Result<Bytes, ReadError> {
    let code = match payload {
        [] => return Ok(Bytes::new()),
        [_] => return Err(ReadError::Protocol("a close frame with half a code")),
        [a, b, reason @ ..] => {
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::Protocol("a close reason that is not UTF-8"));
            }
            u16::from_be_bytes([*a, *b])
        }
    };
    let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    let code = if allowed { code } else { 1002 };
    Ok(Bytes::copy_from_slice(&code.to_be_bytes()))
}

/// A close frame's payload: the code, then the reason (already short enough
/// for a control frame).
pub fn close_payload(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload.into()
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes(chunk.try_into().expect("4 bytes")) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A frame as a client sends it: `first` is FIN, RSV and the opcode.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![first];
        let masked = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(masked | n as u8),
            n if n <= 0xffff => {
                out.push(masked | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(masked | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mut body = payload.to_vec();
        if let Some(mask) = mask {
            out.extend_from_slice(&mask);
            unmask(&mut body, mask);
        }
        out.extend(body);
        out
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        frame(first, payload, Some(MASK))
    }

    async fn next(
        reader: &mut Reader,
        io: &mut (impl AsyncRead + Unpin),
        max: usize,
    ) -> Option<Result<Incoming, ReadError>> {
        std::future::poll_fn(|cx| reader.poll_next(cx, &mut *io, max)).await
    }

    /// Everything the reader makes of `bytes`, up to the first error or end.
    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<Incoming, ReadError>> {
        let mut reader = Reader::default();
        let mut out = Vec::new();
        let mut io = &bytes[..];
        while let Some(item) = next(&mut reader, &mut io, max).await {
            let error = item.is_err();
            out.push(item);
            if error {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn messages_in_one_read_come_out_whole_and_unmasked() {
        let bytes = [
            masked(0x82, b"hello"),
            masked(0x89, b"p"),
            masked(0x8A, b""),
            masked(0x81, b"text"),
            masked(0x82, &[7; 300]),
        ]
        .concat();
        assert_eq!(
            read_all(bytes, 1024).await,
            vec![
                Ok(Incoming::Binary(Bytes::from_static(b"hello"))),
                Ok(Incoming::Ping(Bytes::from_static(b"p"))),
                Ok(Incoming::Pong),
                Ok(Incoming::Text),
                Ok(Incoming::Binary(Bytes::from(vec![7; 300]))),
            ]
        );
    }

    #[tokio::test]
    async fn fragments_join_with_control_frames_between() {
        let bytes = [
            masked(0x02, b"ab"),
            masked(0x89, b""),
            masked(0x00, b"cd"),
            masked(0x80, b"e"),
        ]
        .concat();
        assert_eq!(
            read_all(bytes, 5).await,
            vec![
                Ok(Incoming::Ping(Bytes::new())),
                Ok(Incoming::Binary(Bytes::from_static(b"abcde"))),
            ]
        );
        // One byte over, across fragments: refused before the last is read.
        let bytes = [masked(0x02, b"abc"), masked(0x80, b"def")[..6].to_vec()].concat();
        assert_eq!(read_all(bytes, 5).await, vec![Err(ReadError::TooBig)]);
    }

    #[tokio::test]
    async fn a_large_message_is_refused_from_its_header() {
        let header = masked(0x82, &vec![0; 70_000])[..14].to_vec();
        assert_eq!(read_all(header, 65_536).await, vec![Err(ReadError::TooBig)]);
    }

    #[tokio::test]
    async fn frames_no_client_sends_are_protocol_errors() {
        let cases = [
            frame(0x82, b"x", None),
            masked(0xC2, b"x"),
            masked(0x83, b"x"),
            masked(0x8B, b"x"),
            masked(0x09, b"x"),
            masked(0x89, &[0; 126]),
            masked(0x80, b"x"),
            [masked(0x02, b"x"), masked(0x82, b"y")].concat(),
            masked(0x88, &[3]),
            masked(0x88, &[3, 232, 0xff]),
        ];
        for bytes in cases {
            let read = read_all(bytes.clone(), 1024).await;
            assert!(
                matches!(read.last(), Some(Err(ReadError::Protocol(_)))),
                "{bytes:?} read as {read:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_close_is_echoed_with_a_code_an_endpoint_may_send() {
        let closes = [
            (vec![], vec![]),
            (vec![0x03, 0xe8, b'o', b'k'], vec![0x03, 0xe8]),
            (
                4000u16.to_be_bytes().to_vec(),
                4000u16.to_be_bytes().to_vec(),
            ),
            (
                1005u16.to_be_bytes().to_vec(),
                1002u16.to_be_bytes().to_vec(),
            ),
        ];
        for (sent, echoed) in closes {
            assert_eq!(
                read_all(masked(0x88, &sent), 1024).await,
                vec![Ok(Incoming::Close(Bytes::from(echoed)))]
            );
        }
    }

    #[tokio::test]
    async fn a_frame_arriving_in_pieces_is_kept_until_whole_then_released() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let big = masked(0x82, &[5; 10_000]);
        let small = masked(0x82, b"after");
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&[big, small].concat()).await.unwrap();
            client
        });
        let mut reader = Reader::default();
        assert_eq!(
            next(&mut reader, &mut server, 1 << 20).await,
            Some(Ok(Incoming::Binary(Bytes::from(vec![5; 10_000]))))
        );
        assert_eq!(
            next(&mut reader, &mut server, 1 << 20).await,
            Some(Ok(Incoming::Binary(Bytes::from_static(b"after"))))
        );
        drop(writer.await.unwrap());
        assert_eq!(next(&mut reader, &mut server, 1 << 20).await, None);
        assert_eq!(reader.buf.capacity(), 0, "an idle reader holds no buffer");
    }
}
