//! One socket, after the upgrade: the read and write loop, the rate limit,
//! the heartbeat, the write timeout, the close handshake and shutdown. What
//! the frames mean is the [`Session`]'s business (one per protocol); what the
//! rooms queue for the socket comes through its [`Outbox`].
//!
//! Reads go to the session one message at a time, and the session waits when
//! its room's queue is full: the socket is then not read, and TCP slows the
//! writer down. Rooms write to the socket themselves while it keeps up (see
//! [`Outbox`]); this loop writes only what the socket could not take at once,
//! and its own control frames, through the same queue.

mod close;
mod frames;
mod heartbeat;
mod outbox;
mod rate;
mod upgrade;

pub use close::Close;
pub use heartbeat::Heartbeat;
pub use outbox::{Next, Outbox, Overflow, Queued};
pub use upgrade::Upgrade;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::future::OptionFuture;
use futures::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::metrics::{self as m, MessageKind};
use crate::room::{ConnId, Leave};

use frames::{Incoming, ReadError, Reader};
use outbox::{Io, BULK_BYTES};
use rate::Rate;

/// How long the close handshake waits for the peer's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// After refusing a message it cannot read (too big), how long and how much
/// of the rest the server reads and drops so its close frame is not reset.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A protocol's side of one socket.
pub trait Session: Send {
    /// One binary message from the peer.
    fn frame(&mut self, data: Bytes) -> impl Future<Output = Result<(), Close>> + Send;

    /// A room let one of this socket's memberships go.
    fn left(&mut self, conn: ConnId, why: Leave) -> impl Future<Output = Result<(), Close>> + Send;

    /// When [`Session::expire`] must next be called (a token expiring, an
    /// authentication deadline), if ever.
    fn deadline(&self) -> Option<Instant>;

    fn expire(&mut self) -> impl Future<Output = Result<(), Close>> + Send;

    /// A frame to send on every heartbeat, for protocols whose peers time out
    /// without application messages.
    fn keepalive(&self) -> Option<Bytes> {
        None
    }

    /// What a frame of this protocol is, for the message counters.
    fn kind(frame: &[u8]) -> MessageKind;

    /// For the log line of the socket's end: the document and the user.
    fn describe(&self) -> (String, String);

    /// The socket ended: leave every room.
    fn finish(self) -> impl Future<Output = ()> + Send;
}

/// What every socket shares.
pub struct Context {
    pub limits: Arc<Limits>,
    /// Pings, keepalives and shutdown, for every socket from one timer.
    pub heartbeat: Arc<Heartbeat>,
    /// Turns to write a large batch (a whole document, as after a join).
    pub bulk: Arc<tokio::sync::Semaphore>,
}

/// Large batches written at once. When many clients join one large document
/// together (a join storm after a deploy), writing every copy at once shares
/// the bandwidth fairly and every client finishes at the very end; taking
/// turns in arrival order finishes half of them in half the time, with the
/// same total. Two, so one slow reader never stops the others.
pub const BULK_PERMITS: usize = 2;

/// The longest a batch waits for its turn before it is written anyway, so a
/// peer that reads slowly while holding a turn delays others by this at most.
const BULK_WAIT: Duration = Duration::from_secs(1);

/// How the loop ended.
enum End {
    /// We close, with this code; `unreadable` when the peer's stream broke
    /// mid-message (what it still sends must be drained raw).
    Close { close: Close, unreadable: bool },
    /// The peer is gone already.
    PeerGone(&'static str),
}

impl From<Close> for End {
    fn from(close: Close) -> Self {
        End::Close {
            close,
            unreadable: false,
        }
    }
}

/// Serves one socket: `open` makes the session (joining its first room, or
/// refusing the socket) with the socket's outbox, then the loop runs until the
/// socket ends, and the end is logged and counted. The returned future is the
/// socket's whole life.
///
/// Two futures chained, the first boxed and freed before the second starts:
/// an async fn keeps its arguments for its whole life, so one future for both
/// would make every idle socket's task carry what opening it needed.
pub fn run<S, F, Fut>(io: Io, ctx: Arc<Context>, open: F) -> impl Future<Output = ()>
where
    S: Session,
    F: FnOnce(Outbox) -> Fut,
    Fut: Future<Output = Result<S, Close>>,
{
    Box::pin(start(io, ctx, open))
        .then(|live| OptionFuture::from(live.map(Live::run)))
        .map(drop)
}

/// A socket whose session is open. Boxed: an async fn that takes a value
/// keeps room for it twice (the argument and the body's binding).
///
/// What the loop keeps between turns lives here too, not in its future: the
/// task every idle socket carries is sized in steps of 128 bytes, and this
/// box by the byte.
struct Live<S> {
    reader: Reader,
    session: S,
    queued: Queued,
    ctx: Arc<Context>,
    started: Instant,
    rate: Rate,
    /// When the peer last sent anything (a pong included), in milliseconds
    /// after `started`.
    last_heard: u64,
    /// Allocated only while the session has a deadline: an idle socket would
    /// otherwise carry a timer it never uses.
    timer: Option<Pin<Box<Sleep>>>,
}

/// Opens the session; a refused socket is closed here, and `None` returned.
async fn start<S, F, Fut>(io: Io, ctx: Arc<Context>, open: F) -> Option<Box<Live<S>>>
where
    S: Session,
    F: FnOnce(Outbox) -> Fut,
    Fut: Future<Output = Result<S, Close>>,
{
    let started = Instant::now();
    m::connections(1.0);
    let limits = &ctx.limits;
    let (outbox, queued) =
        Outbox::with_io(io, limits.outbox_capacity, limits.outbox_bytes, S::kind);
    let mut reader = Reader::default();
    match open(outbox).await {
        Ok(session) => Some(Box::new(Live {
            reader,
            session,
            queued,
            rate: Rate::default(),
            ctx,
            started,
            last_heard: 0,
            timer: None,
        })),
        Err(close) => {
            close_handshake::<S>(&mut reader, &queued, &close, None, false, &ctx).await;
            ended(started, &End::from(close), ("-".into(), "-".into()));
            None
        }
    }
}

impl<S: Session> Live<S> {
    async fn run(mut self: Box<Self>) {
        self.ctx.heartbeat.join(&self.queued);
        let end = self.serve().await;
        // Boxed, as everything that runs once: only the loop's state should
        // size the task every idle socket carries.
        Box::pin(self.finish(end)).await;
    }

    async fn finish(self: Box<Self>, end: End) {
        let Live {
            mut reader,
            mut session,
            queued,
            ctx,
            started,
            ..
        } = *self;
        ctx.heartbeat.leave(&queued);
        if let End::Close { close, unreadable } = &end {
            let late = close.accepts_late_frames().then_some(&mut session);
            close_handshake(&mut reader, &queued, close, late, *unreadable, &ctx).await;
        }
        let described = session.describe();
        session.finish().await;
        ended(started, &end, described);
    }
}

/// Logs and counts the end of a socket.
fn ended(started: Instant, end: &End, (doc, user): (String, String)) {
    let (code, reason) = match end {
        End::Close { close, .. } => (Some(close.code()), close.reason()),
        End::PeerGone(why) => (None, (*why).into()),
    };
    m::connections(-1.0);
    let code_label = code.map_or_else(|| "none".to_string(), |c| c.to_string());
    metrics::counter!(m::CONNECTIONS_CLOSED, "code" => code_label).increment(1);
    let duration = started.elapsed();
    metrics::histogram!(m::CONNECTION_SECONDS).record(duration.as_secs_f64());
    tracing::info!(
        doc,
        user,
        duration_ms = duration.as_millis() as u64,
        code = code.unwrap_or(0),
        reason = %reason,
        "connection closed"
    );
}

/// What one turn of the loop must await, after the select that found it.
///
/// The loop's task is every idle socket's largest cost, and its size is that
/// of its largest state. Awaiting these inside the select's arms made the
/// values they hold (a message, the select's output) keep places of their own
/// beside the select's futures; run from one boxed future instead, the idle
/// state is the select and little else.
enum Step {
    Expire,
    Left(ConnId, Leave),
    Flush,
    Frame(Bytes),
    /// The peer's close frame, and what to echo in ours.
    PeerClosed(Bytes),
}

impl Step {
    async fn run<S: Session>(
        self,
        session: &mut S,
        queued: &Queued,
        ctx: &Context,
    ) -> Result<(), End> {
        match self {
            Step::Expire => Ok(session.expire().await?),
            Step::Left(conn, why) => Ok(session.left(conn, why).await?),
            Step::Flush => flush(queued, ctx).await,
            Step::Frame(data) => Ok(session.frame(data).await?),
            Step::PeerClosed(reply) => {
                queued.close();
                queued.send_control(frames::CLOSE, reply);
                let _ = tokio::time::timeout(CLOSE_WAIT, write_out(queued)).await;
                Err(End::PeerGone("peer closed"))
            }
        }
    }
}

impl<S: Session> Live<S> {
    /// How long since the peer last sent anything.
    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.last_heard);
        self.started.elapsed().saturating_sub(heard)
    }

    async fn serve(&mut self) -> End {
        let limits = &*self.ctx.limits;
        loop {
            match (self.session.deadline(), &mut self.timer) {
                (None, t) => *t = None,
                (Some(at), Some(t)) if t.deadline() == at => {}
                (Some(at), Some(t)) => t.as_mut().reset(at),
                (Some(at), t) => *t = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            let step = tokio::select! {
                biased;
                _ = expired(&mut self.timer) => {
                    self.timer = None;
                    Some(Step::Expire)
                }
                // Before the reads, so shutdown is heard even by a socket always
                // busy.
                next = self.queued.wait() => match next {
                    Next::ShuttingDown => return Close::ShuttingDown.into(),
                    Next::Beat { ping } => {
                        if let Some(frame) = self.session.keepalive() {
                            self.queued.send(frame);
                        }
                        if !ping {
                            None
                        } else if self.silent_for() >= limits.pong_timeout {
                            return Close::NoPong.into();
                        } else {
                            self.queued.send_control(frames::PING, Bytes::new());
                            None
                        }
                    }
                    Next::Leave(conn, why) => Some(Step::Left(conn, why)),
                    Next::Write => Some(Step::Flush),
                    // Every handle is gone without a word: the room is gone (a
                    // reload after a broken document, or a bug), so reconnect.
                    Next::Gone => return Close::Reloading("document unloaded").into(),
                },
                msg = next(&mut self.reader, &self.queued, limits) => {
                    let msg = match msg {
                        None => return End::PeerGone("peer closed"),
                        Some(Err(error)) => return read_error(error),
                        Some(Ok(msg)) => msg,
                    };
                    let elapsed = self.started.elapsed();
                    self.last_heard = elapsed.as_millis() as u64;
                    let (per_second, burst) = (limits.rate_limit_per_second, limits.rate_limit_burst);
                    if !self.rate.check(elapsed, per_second, burst) {
                        return Close::RateLimited.into();
                    }
                    match msg {
                        Incoming::Binary(data) => {
                            m::received(S::kind(&data), data.len());
                            Some(Step::Frame(data))
                        }
                        Incoming::Text => {
                            return Close::Protocol("text frames are not part of the protocol".into()).into();
                        }
                        Incoming::Close(reply) => Some(Step::PeerClosed(reply)),
                        Incoming::Ping(payload) => {
                            self.queued.send_control(frames::PONG, payload);
                            None
                        }
                        Incoming::Pong => None,
                    }
                }
            };
            if let Some(step) = step {
                let run = step.run(&mut self.session, &self.queued, &self.ctx);
                if let Err(end) = Box::pin(run).await {
                    return end;
                }
            }
        }
    }
}

/// Writes what the socket could not take when the rooms wrote. A peer that
/// stops reading blocks this once the socket's buffers are full, and the
/// loop with it (a leave a room asks for meanwhile is handled after); after
/// `pong_timeout` without progress the peer is dropped. A large backlog (a
/// whole document after a join) first waits for its turn.
async fn flush(queued: &Queued, ctx: &Context) -> Result<(), End> {
    let _turn = if queued.queued_bytes() >= BULK_BYTES {
        tokio::time::timeout(BULK_WAIT, ctx.bulk.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    loop {
        match tokio::time::timeout(ctx.limits.pong_timeout, queued.progress()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {}
            Ok(Err(_)) => return Err(End::PeerGone("write failed")),
            Err(_) => return Err(End::PeerGone("write timed out")),
        }
    }
}

/// The peer's next message.
fn next<'a>(
    reader: &'a mut Reader,
    queued: &'a Queued,
    limits: &Limits,
) -> impl Future<Output = Option<Result<Incoming, ReadError>>> + 'a {
    let max = limits.max_message_bytes;
    std::future::poll_fn(move |cx| reader.poll_next(cx, queued, max))
}

/// Writes everything queued.
async fn write_out(queued: &Queued) -> std::io::Result<()> {
    while !queued.progress().await? {}
    Ok(())
}

/// Ready when the session's deadline passes; never without one.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(|cx| match timer {
        Some(timer) => timer.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

fn read_error(error: ReadError) -> End {
    match error {
        ReadError::TooBig => End::Close {
            close: Close::TooBig,
            unreadable: true,
        },
        ReadError::Protocol(e) => End::Close {
            close: Close::Protocol(format!("websocket protocol error: {e}")),
            unreadable: true,
        },
        ReadError::Io => End::PeerGone("read failed"),
    }
}

/// Sends the close frame, then reads until the peer's close arrives (at most
/// a second), so the code reaches a peer that is still sending. What the peer
/// sent meanwhile is dropped, unless `late` names the session to hand it to.
/// A stream that broke mid-message is read raw and dropped instead, bounded
/// in bytes and time, until the peer closes its side: closing with unread
/// bytes would make the kernel reset the connection, and the close frame
/// would be lost with it.
async fn close_handshake<S: Session>(
    reader: &mut Reader,
    queued: &Queued,
    close: &Close,
    mut late: Option<&mut S>,
    unreadable: bool,
    ctx: &Context,
) {
    let deadline = Instant::now() + CLOSE_WAIT;
    queued.close();
    let payload = frames::close_payload(close.code(), &close.reason());
    queued.send_control(frames::CLOSE, payload);
    // A peer that is not reading would block this write for ever.
    if !matches!(
        tokio::time::timeout_at(deadline, write_out(queued)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let drain_bytes = 2 * ctx.limits.max_message_bytes + (1 << 20);
    if unreadable {
        return drain(queued, drain_bytes).await;
    }
    loop {
        match tokio::time::timeout_at(deadline, next(reader, queued, &ctx.limits)).await {
            Ok(Some(Ok(Incoming::Binary(data)))) => {
                if let Some(session) = late.as_deref_mut() {
                    let _ = session.frame(data).await;
                }
            }
            Ok(Some(Ok(Incoming::Close(_)))) | Ok(None) | Err(_) => return,
            // Nothing more is sent after our close frame, pongs included.
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) => return drain(queued, drain_bytes).await,
        }
    }
}

/// Reads and drops what the peer still sends, until it closes its side or
/// `max_bytes` or [`DRAIN_TIME`] run out, then closes ours.
async fn drain(queued: &Queued, max_bytes: usize) {
    let mut io = queued;
    let deadline = Instant::now() + DRAIN_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    while total < max_bytes {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, queued.shutdown()).await;
}
