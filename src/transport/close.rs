//! Every way a socket ends, and the one place that maps it to a WebSocket
//! close code and reason.

use std::borrow::Cow;

use crate::room::Leave;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// A token missing, malformed, badly signed, expired or not yet valid.
    Unauthorized(&'static str),
    /// A valid token without access to the document.
    Forbidden,
    /// A message larger than the limit.
    TooBig,
    /// The per-connection rate limit.
    RateLimited,
    /// A message that breaks a rule of the server (awareness limits).
    Policy(&'static str),
    /// A message that cannot be decoded, or a frame the protocol does not allow.
    Protocol(String),
    /// The socket's outgoing queue overflowed; it reconnects and resyncs.
    SlowConsumer,
    /// The server cannot take this now (storage away, a room overloaded).
    TryAgain(String),
    /// The server is shutting down.
    ShuttingDown,
    /// The document broke in memory, or its room went away: reconnect to a
    /// room loaded afresh.
    Reloading(&'static str),
    /// Nothing heard from the peer, not even a pong, for the pong timeout.
    NoPong,
    /// Frames queued before authentication went past their bounds (Hocuspocus).
    PendingBounds,
    /// No document authenticated before the deadline (Hocuspocus).
    AuthTimeout,
    /// A bug.
    Internal(String),
}

impl Close {
    pub fn code(&self) -> u16 {
        match self {
            Close::Unauthorized(_) => 4401,
            Close::Forbidden => 4403,
            Close::TooBig => 1009,
            Close::RateLimited | Close::Policy(_) => 1008,
            Close::Protocol(_) => 1002,
            Close::SlowConsumer | Close::TryAgain(_) => 1013,
            Close::ShuttingDown | Close::Reloading(_) => 1012,
            Close::NoPong => 1001,
            Close::PendingBounds => 4205,
            Close::AuthTimeout => 4408,
            Close::Internal(_) => 1011,
        }
    }

    /// The reason sent in the close frame (at most 123 bytes, by RFC 6455).
    pub fn reason(&self) -> Cow<'static, str> {
        let reason: Cow<'static, str> = match self {
            Close::Unauthorized(why) => Cow::Borrowed(why),
            Close::Forbidden => "forbidden".into(),
            Close::TooBig => "message too big".into(),
            Close::RateLimited => "rate limit".into(),
            Close::Policy(why) => Cow::Borrowed(why),
            Close::Protocol(why) | Close::TryAgain(why) | Close::Internal(why) => {
                Cow::Owned(why.clone())
            }
            Close::SlowConsumer => "slow consumer: outgoing queue overflowed".into(),
            Close::ShuttingDown => "server shutting down".into(),
            Close::Reloading(why) => Cow::Borrowed(why),
            Close::NoPong => "no pong".into(),
            Close::PendingBounds => "Reset Connection".into(),
            Close::AuthTimeout => "Connection Timeout".into(),
        };
        match reason {
            Cow::Owned(mut s) if s.len() > 123 => {
                let mut end = 123;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
                Cow::Owned(s)
            }
            reason => reason,
        }
    }

    /// Whether what the peer sends after our close is still accepted: only on
    /// a graceful shutdown, so an orderly restart loses nothing.
    pub fn accepts_late_frames(&self) -> bool {
        *self == Close::ShuttingDown
    }
}

impl From<Leave> for Close {
    fn from(leave: Leave) -> Self {
        match leave {
            Leave::SlowConsumer => Close::SlowConsumer,
            Leave::BadUpdate(why) => Close::Protocol(why),
            Leave::BadAwareness(why) => Close::Policy(why),
            Leave::Overloaded(why) => Close::TryAgain(why),
            Leave::Reloading => Close::Reloading("document reloading"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame() {
        let long = Close::Protocol("é".repeat(100));
        assert!(long.reason().len() <= 123);
        assert_eq!(Close::RateLimited.reason(), "rate limit");
        assert_eq!(Close::from(Leave::SlowConsumer).code(), 1013);
        assert!(Close::ShuttingDown.accepts_late_frames());
        assert!(!Close::Reloading("document reloading").accepts_late_frames());
    }
}
