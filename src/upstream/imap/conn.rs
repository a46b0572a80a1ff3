//! One upstream IMAP connection: the command [`Engine`] and the state of the FETCHes streamed
//! over it (see [`super::fetch`]). Every command first reads the rest of a streamed or
//! prefetched FETCH, so the engine always finds the connection between responses.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use imap_next::imap_types::command::CommandBody;

use super::engine::{Completion, ConnLimits, Engine, ImapError, Untagged};
use super::fetch_parse::FetchInfo;
use super::login::LoginCommand;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::transport::AsyncStream;

/// The state of one streamed `UID FETCH <uid> (UID BODY.PEEK[])` (or of a range of the
/// body, `BODY.PEEK[]<origin.n>`).
pub(super) struct BodyStream {
    pub(super) tag: String,
    pub(super) uid: u32,
    /// The other UIDs of the command, read ahead whole.
    pub(super) others: Vec<u32>,
    /// Literal bytes still to come.
    pub(super) left: u64,
    /// A body that came as a quoted string instead of a literal, not yet handed out.
    pub(super) inline: Option<Bytes>,
    /// Items of the FETCH response follow the literal (not so for a quoted body, whose line
    /// was parsed whole).
    pub(super) items_pending: bool,
    /// Where in the message the body starts: a range (TOP's remainder) is read to its end
    /// whatever its size once abandoned, instead of giving up the connection.
    pub(super) origin: u32,
    /// The whole literal was handed out; the rest of the response (read-ahead bodies, the
    /// completion) is read by [`ImapConnection::settle`], so it arrives while the client is
    /// being sent the end of this message instead of delaying it.
    pub(super) delivered: bool,
    pub(super) info: FetchInfo,
    pub(super) started: Instant,
    /// The command's tagged completion, if it came early (before the command was read:
    /// see [`ImapConnection::stash`]); nothing more of it is then read from the socket.
    pub(super) done: Option<Completion>,
}

/// A `UID FETCH <uid>,<others> (UID BODY.PEEK[])` sent but not read yet: its response follows
/// the current one (if any) in the socket, bounded by the kernel's buffers, until the next
/// RETR streams it ([`ImapConnection::body_start`]) or the next other command drains it.
pub(super) struct Prefetch {
    pub(super) tag: String,
    pub(super) uid: u32,
    pub(super) others: Vec<u32>,
    pub(super) started: Instant,
    /// `Some(len)`: the FETCH asks for the first `len` octets of every UID (TOP's pieces,
    /// read whole by [`ImapConnection::fetch_heads`]), not for whole bodies.
    pub(super) heads: Option<u32>,
    /// Its tagged completion, if it came while an earlier command was read (servers may
    /// run pipelined FETCHes concurrently: see [`ImapConnection::stash`]).
    pub(super) done: Option<Completion>,
}

/// At most this many FETCHes pending unread ([`ImapConnection::prefetch`]); the maildrop
/// sizes its queue (count and listed octets) within this.
pub const PREFETCH_QUEUE_MAX: usize = 8;

/// At most this many octets of bodies read early into [`ImapConnection::stash`] (bodies of a
/// pending FETCH the server sent in the middle of an earlier one's response); the maildrop
/// keeps the listed octets of its queue below this, so only a server lying about sizes can
/// reach it, and that ends the connection.
pub(super) const STASH_MAX: u64 = 3 * DRAIN_MAX;

/// The length asked for the rest of a body from an origin: more than any message.
pub(super) const RANGE_TO_END: u32 = i32::MAX as u32;

/// Largest literal accepted for a message read ahead (they are asked for only when the
/// listing says they are small; this bounds what a lying server can make us hold).
pub(super) const AHEAD_LITERAL_MAX: u32 = 512 * 1024;

/// How [`ImapConnection::body_start`] went.
pub enum BodyStart {
    /// The literal has begun: read it with [`ImapConnection::body_next`].
    Streaming,
    /// The command completed without a body for the UID (expunged, or refused).
    NoBody(Completion),
}

/// Where [`ImapConnection::fetch_lines`] stopped.
pub(super) enum Step {
    /// A body literal of `len` octets starts next in the buffer.
    Body {
        len: u32,
        info: FetchInfo,
    },
    /// A FETCH response whose body came inline: a quoted string, or `None` for `NIL` (the
    /// server has no body for the message: another client expunged it).
    Inline {
        data: Option<Bytes>,
        info: FetchInfo,
    },
    Done(Completion),
}

/// An abandoned body stream is read to its end if at most this much is left; otherwise the
/// connection is given up.
pub(super) const DRAIN_MAX: u64 = 4 << 20;

/// An IMAP connection: its command [`Engine`], and the state of the FETCHes streamed over it.
pub struct ImapConnection {
    pub(super) engine: Engine,
    /// A FETCH body being streamed by [`Self::body_next`].
    pub(super) body: Option<BodyStream>,
    /// Whole read-ahead messages that came with the streamed FETCH, for the maildrop.
    pub(super) ahead: Vec<(u32, Bytes)>,
    /// FETCHes sent ahead of the client's next RETRs ([`Self::prefetch`]), in the order sent,
    /// whose responses are still unread in the socket (bounded: [`PREFETCH_QUEUE_MAX`]).
    pub(super) prefetch: VecDeque<Prefetch>,
    /// Bodies (or `None`: NIL, gone) of messages of pending FETCHes that arrived while an
    /// earlier command's response was read. Dovecot runs pipelined UID FETCHes concurrently
    /// and interleaves their responses (whole FETCH responses, never inside one) whenever its
    /// output blocks between two messages: the responses of a FETCH sent ahead can come
    /// before the rest of the one being read, and its tagged completion too. Bounded by
    /// [`STASH_MAX`] octets.
    pub(super) stash: HashMap<u32, Option<Bytes>>,
    pub(super) stash_bytes: u64,
    /// The server was seen to send `UID` before `BODY[]` in a FETCH response, so a FETCH of
    /// several UIDs can be streamed (each literal is known to be whose before it arrives).
    pub(super) uid_before_body: bool,
    /// A streamed FETCH has shown in which order this server sends `UID` and `BODY[]`
    /// (on this connection, or on an earlier one to the same server: [`FetchOrder`]).
    pub(super) fetch_order_known: bool,
    /// Shared with the other connections to the same server.
    pub(super) fetch_order: Option<Arc<FetchOrder>>,
    /// When the server accepted this connection's credentials (see [`Self::login_age`]).
    pub(super) logged_in_at: Option<std::time::Instant>,
}

/// Whether a server sends `UID` before `BODY[]` in its FETCH responses, as the connections
/// to it have seen: learnt once per server rather than once per session (the first FETCH of
/// a session that does not know it has to name one message only).
#[derive(Debug, Default)]
pub struct FetchOrder(AtomicU8);

impl FetchOrder {
    const UID_FIRST: u8 = 1;
    const UID_AFTER: u8 = 2;

    /// `Some(true)` when UID comes first, `None` while unknown.
    pub fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            Self::UID_FIRST => Some(true),
            Self::UID_AFTER => Some(false),
            _ => None,
        }
    }

    pub fn set(&self, uid_first: bool) {
        let v = if uid_first {
            Self::UID_FIRST
        } else {
            Self::UID_AFTER
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

impl ImapConnection {
    /// Connect to `endpoint`, secure the connection as it says, and read the greeting.
    pub async fn connect(
        endpoint: &Endpoint,
        limits: ConnLimits,
    ) -> Result<ImapConnection, ImapError> {
        Ok(Self::with(Engine::connect(endpoint, limits).await?))
    }

    /// A connection over an established stream (`greeting_done`: the greeting was already
    /// read, as after STARTTLS).
    pub async fn over(
        io: Box<dyn AsyncStream>,
        limits: ConnLimits,
        greeting_done: bool,
    ) -> Result<ImapConnection, ImapError> {
        Ok(Self::with(Engine::over(io, limits, greeting_done).await?))
    }

    fn with(engine: Engine) -> ImapConnection {
        ImapConnection {
            engine,
            body: None,
            ahead: Vec::new(),
            prefetch: VecDeque::new(),
            stash: HashMap::new(),
            stash_bytes: 0,
            uid_before_body: false,
            fetch_order_known: false,
            fetch_order: None,
            logged_in_at: None,
        }
    }

    /// How long ago the server accepted this connection's credentials (`None`: not logged in
    /// by [`super::session::open`]). A connection kept between sessions is kept only while
    /// its login is younger than the keep-alive: a password changed on the server must not
    /// be outlived by a connection that polls keep taking up again.
    pub fn login_age(&self) -> Option<std::time::Duration> {
        self.logged_in_at.map(|t| t.elapsed())
    }

    /// Run one command to its tagged completion (see [`Engine::execute`]), after reading
    /// the rest of any streamed or prefetched FETCH.
    pub async fn execute(
        &mut self,
        body: CommandBody<'static>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Completion, ImapError> {
        self.abandon_body().await?;
        self.drain_prefetch().await?;
        self.engine.execute(body, on_untagged).await
    }

    /// Commands pipelined (see [`Engine::execute_all`]), after reading the rest of any
    /// streamed or prefetched FETCH.
    pub async fn execute_all(
        &mut self,
        bodies: Vec<CommandBody<'static>>,
        on_untagged: impl FnMut(Untagged),
    ) -> Result<Vec<Completion>, ImapError> {
        self.abandon_body().await?;
        self.drain_prefetch().await?;
        self.engine.execute_all(bodies, on_untagged).await
    }

    /// See [`Engine::take_sasl_challenge`].
    pub fn take_sasl_challenge(&mut self) -> Option<Vec<u8>> {
        self.engine.take_sasl_challenge()
    }

    /// See [`Engine::offers_sasl_ir`].
    pub fn offers_sasl_ir(&self) -> bool {
        self.engine.offers_sasl_ir()
    }

    /// See [`Engine::execute_login`] (a login is the first command: nothing to drain).
    pub async fn execute_login(&mut self, login: LoginCommand) -> Result<Completion, ImapError> {
        self.engine.execute_login(login).await
    }

    /// See [`Engine::execute_login_after`].
    pub async fn execute_login_after(
        &mut self,
        before: Option<CommandBody<'static>>,
        login: LoginCommand,
    ) -> Result<Completion, ImapError> {
        self.engine.execute_login_after(before, login).await
    }

    /// See [`Engine::offers_id`].
    pub fn offers_id(&self) -> bool {
        self.engine.offers_id()
    }

    /// Whether the connection sits between responses with nothing owed to it (no streamed
    /// or prefetched FETCH unread, nothing buffered, not broken) and the server has neither
    /// closed it nor sent anything unasked (an untagged `BYE` before an idle logout): a
    /// connection fit to be kept for a later session, or to be taken up again. Looks at the
    /// socket once, without waiting.
    pub fn is_quiet(&mut self) -> bool {
        if self.engine.broken
            || self.body.is_some()
            || !self.prefetch.is_empty()
            || !self.engine.reader.is_empty()
        {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let io = std::pin::Pin::new(&mut self.engine.io);
        // Pending: nothing to read, the connection is open. Anything else (EOF, data, an
        // error) means it cannot be used as it is.
        match tokio::io::AsyncRead::poll_read(io, &mut cx, &mut buf) {
            std::task::Poll::Pending => true,
            std::task::Poll::Ready(_) => {
                self.engine.broken = true;
                false
            }
        }
    }

    /// Forget what the last session left on the connection (bodies read ahead, the stash of
    /// early bodies): the next session starts clean. Call only when [`Self::is_quiet`].
    pub fn reset_for_reuse(&mut self) {
        self.ahead.clear();
        self.stash.clear();
        self.stash_bytes = 0;
        self.engine.reader.shrink_idle();
    }

    /// Say LOGOUT and wait briefly for the answer; errors are irrelevant at this point.
    pub async fn logout(self) {
        self.logout_after(Vec::new()).await;
    }

    /// Run `before` pipelined with a LOGOUT behind it, waiting briefly (see
    /// [`Engine::logout_after`]), after reading the rest of any streamed FETCH.
    pub async fn logout_after(mut self, before: Vec<CommandBody<'static>>) -> Vec<String> {
        let owed = before.len();
        let drained = async {
            self.abandon_body().await?;
            self.drain_prefetch().await
        };
        if let Err(e) = drained.await {
            return if owed > 0 {
                vec![e.to_string()]
            } else {
                Vec::new()
            };
        }
        self.engine.logout_after(before).await
    }
}
