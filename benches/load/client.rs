//! The generator's client: a socket of one document, speaking y-websocket
//! or Hocuspocus's framing of it, and the tokens its writers append.
//!
//! Every update a writer sends appends a token `~WRITER.SEQ.MICROS~` to the
//! text `t`: readers find the tokens in the raw update bytes, without
//! decoding them (the generator must stay cheaper than the servers it
//! measures), and a fresh client that syncs the document after a run counts
//! which tokens are missing.

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as Ws;
use yrs::encoding::write::Write;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, Text, TextRef, Transact, Update};

use crate::targets::Protocol;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client socket of one document, synced.
pub struct Peer {
    pub ws: Socket,
    pub doc: Doc,
    pub framing: Framing,
}

/// Frames messages for one document on one socket. y-websocket sends them
/// bare, one document per socket named by the path; Hocuspocus multiplexes
/// documents over a socket, so each message starts with the document's name,
/// and a document opens with an auth message.
#[derive(Clone)]
pub struct Framing {
    /// The document's name as Hocuspocus prefixes it; empty for y-websocket.
    prefix: Vec<u8>,
}

impl Framing {
    pub fn new(protocol: Protocol, doc: &str) -> Self {
        let mut prefix = Vec::new();
        if protocol == Protocol::Hocuspocus {
            prefix.write_string(doc);
        }
        Self { prefix }
    }

    /// What opens the document before its sync, if anything: Hocuspocus's
    /// auth (2), token subtype (0), an empty token (no server here checks it).
    fn opening(&self) -> Option<Ws> {
        if self.prefix.is_empty() {
            return None;
        }
        let mut auth = self.prefix.clone();
        auth.write_var(2u32);
        auth.write_var(0u32);
        auth.write_string("");
        Some(Ws::Binary(auth.into()))
    }

    pub fn encode(&self, msg: Message) -> Ws {
        let mut frame = self.prefix.clone();
        frame.extend(msg.encode_v1());
        Ws::Binary(frame.into())
    }

    /// A document update, framed.
    pub fn update(&self, update: &[u8]) -> Ws {
        let mut frame = Vec::with_capacity(self.prefix.len() + update.len() + 8);
        frame.extend_from_slice(&self.prefix);
        frame.extend_from_slice(&[0, 2]);
        frame.write_buf(update);
        Ws::Binary(frame.into())
    }

    /// The y-protocols message a frame carries; `None` for what the bench
    /// ignores (Hocuspocus's auth answers and sync acknowledgements).
    pub fn decode(&self, data: &[u8]) -> Option<Message> {
        let body = self.body(data)?;
        match body.first()? {
            0 | 1 | 3 => Message::decode_v1(body).ok(),
            // A sync reply: a sync message that asks for no step 2 back.
            4 => Message::decode_v1(&[&[0], &body[1..]].concat()).ok(),
            _ => None,
        }
    }

    /// The bytes of a frame after its document prefix.
    pub fn body<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        data.strip_prefix(self.prefix.as_slice())
    }
}

/// Connects to `doc` at `url` and completes the sync handshake.
pub async fn connect(url: &str, doc_name: &str, protocol: Protocol) -> Peer {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let framing = Framing::new(protocol, doc_name);
    if let Some(opening) = framing.opening() {
        ws.send(opening).await.unwrap();
    }
    let doc = Doc::new();
    let sv = doc.transact().state_vector();
    ws.send(framing.encode(Message::Sync(SyncMessage::SyncStep1(sv))))
        .await
        .unwrap();
    loop {
        let Some(Ok(msg)) = ws.next().await else {
            panic!("closed during handshake")
        };
        let Ws::Binary(data) = msg else { continue };
        match framing.decode(&data) {
            Some(Message::Sync(SyncMessage::SyncStep2(u))) => {
                doc.transact_mut()
                    .apply_update(Update::decode_v1(&u).unwrap())
                    .unwrap();
                return Peer { ws, doc, framing };
            }
            Some(Message::Sync(SyncMessage::SyncStep1(_))) => {
                let reply = Message::Sync(SyncMessage::SyncStep2(Update::EMPTY_V1.to_vec()));
                ws.send(framing.encode(reply)).await.unwrap();
            }
            _ => {}
        }
    }
}

/// What a writer appends: its own run of tokens at the end of what it wrote.
/// It never applies what others write (that would cost the generator a yrs
/// integration per delivery), so its tokens form one run that yrs merges into
/// one block, as typing does.
pub struct Writer {
    doc: Doc,
    text: TextRef,
    pub id: u32,
    pub seq: u32,
}

impl Writer {
    pub fn new(id: u32) -> Self {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        Self {
            doc,
            text,
            id,
            seq: 0,
        }
    }

    /// The update appending the next token, stamped `micros`.
    pub fn next(&mut self, micros: u64) -> Vec<u8> {
        self.seq += 1;
        let token = format!("~{}.{}.{micros}~", self.id, self.seq);
        let mut txn = self.doc.transact_mut();
        let end = self.text.len(&txn);
        self.text.insert(&mut txn, end, &token);
        // Encoded inside the transaction, before yrs merges the new block
        // into the run: after the merge, slicing it out would walk the run.
        txn.encode_update_v1()
    }
}

/// A token found in an update or a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    pub writer: u32,
    pub seq: u32,
    pub micros: u64,
}

/// Every token in `bytes`. Binary around the text may hold a `~` byte; a
/// candidate that does not parse is skipped, and its closing `~` may open the
/// next one.
pub fn tokens(bytes: &[u8], mut found: impl FnMut(Token)) {
    let mut i = 0;
    while let Some(open) = memchr(b'~', &bytes[i..]).map(|o| i + o) {
        let Some(close) = memchr(b'~', &bytes[open + 1..]).map(|o| open + 1 + o) else {
            return;
        };
        match parse(&bytes[open + 1..close]) {
            Some(token) => {
                found(token);
                i = close + 1;
            }
            None => i = close,
        }
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

fn parse(inner: &[u8]) -> Option<Token> {
    let text = std::str::from_utf8(inner).ok()?;
    let mut parts = text.split('.');
    let token = Token {
        writer: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
        micros: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(token)
}

/// The text of a synced document, for counting tokens.
pub fn text_of(doc: &Doc) -> String {
    let text = doc.get_or_insert_text("t");
    text.get_string(&doc.transact())
}
