//! Raw Hocuspocus frames and sockets, for tests that must send what no
//! provider would.

use futures::StreamExt;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use yrs::encoding::read::{Cursor, Read};
use yrs::encoding::write::Write;

use super::{Server, WAIT};

pub const SYNC: u64 = 0;
pub const AUTH: u64 = 2;
pub const STATELESS: u64 = 5;

/// `varString address | varUint type | payload`.
pub fn frame(address: &str, kind: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.write_string(address);
    buf.write_var(kind);
    buf.extend_from_slice(payload);
    buf
}

/// A v4 provider's auth message: token, then its version.
pub fn auth(address: &str, token: &str) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.write_var(0u8);
    payload.write_string(token);
    payload.write_string("4.8.0");
    frame(address, AUTH, &payload)
}

/// A sync step 1 with an empty state vector.
pub fn step1(address: &str) -> Vec<u8> {
    frame(address, SYNC, &[0, 1, 0])
}

/// Address, type and the rest of a frame the server sent.
pub fn parse(frame: &[u8]) -> (String, u64, Vec<u8>) {
    let mut cursor = Cursor::new(frame);
    let address = cursor.read_string().expect("address").to_string();
    let kind: u64 = cursor.read_var().expect("type");
    (address, kind, frame[cursor.next..].to_vec())
}

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn open(server: &Server) -> Socket {
    let url = server.http("/hocuspocus").replacen("http", "ws", 1);
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws
}

/// Reads until the server's close frame; other frames are ignored.
pub async fn closed_with(
    ws: &mut (impl StreamExt<Item = Result<WsMessage, WsError>> + Unpin),
) -> (u16, String) {
    tokio::time::timeout(WAIT, async {
        while let Some(Ok(msg)) = ws.next().await {
            if let WsMessage::Close(Some(f)) = msg {
                return (u16::from(f.code), f.reason.to_string());
            }
        }
        (1006, String::new())
    })
    .await
    .expect("close within the wait")
}

/// Reads frames until one for `address` of type `kind` arrives; returns its payload.
pub async fn next_of(ws: &mut Socket, address: &str, kind: u64) -> Vec<u8> {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(data))) if data.len() > 1 => {
                    let (a, k, rest) = parse(&data);
                    if a == address && k == kind {
                        return rest;
                    }
                }
                Some(Ok(WsMessage::Close(f))) => panic!("closed while waiting: {f:?}"),
                None | Some(Err(_)) => panic!("socket ended while waiting"),
                _ => {}
            }
        }
    })
    .await
    .expect("frame within the wait")
}
