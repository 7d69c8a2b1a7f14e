//! A TLS connector whose connections stop reading and writing at a deadline until the login
//! is over: the `postgres` crate bounds only the TCP connect, and a server that accepts and
//! then stays silent would otherwise hold a connect (and its thread) for ever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use postgres_native_tls::MakeTlsConnector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Wraps the connector's TLS for one attempt: the handshake, startup and login must be done
/// by `deadline`; [`Login::done`] lifts the limit for the session that follows.
#[derive(Clone)]
pub(super) struct DeadlineTls {
    inner: MakeTlsConnector,
    deadline: Instant,
    done: Arc<AtomicBool>,
}

/// Marks the login of a [`DeadlineTls`] attempt as over.
pub(super) struct Login(Arc<AtomicBool>);

impl Login {
    pub(super) fn done(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl DeadlineTls {
    pub(super) fn new(inner: MakeTlsConnector, deadline: Instant) -> (Self, Login) {
        let done = Arc::new(AtomicBool::new(false));
        let login = Login(Arc::clone(&done));
        (
            Self {
                inner,
                deadline,
                done,
            },
            login,
        )
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the server did not finish the login within the connect timeout",
    )
}

impl MakeTlsConnect<Socket> for DeadlineTls {
    type Stream = DeadlineStream<<MakeTlsConnector as MakeTlsConnect<Socket>>::Stream>;
    type TlsConnect = DeadlineConnect;
    type Error = <MakeTlsConnector as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<DeadlineConnect, Self::Error> {
        Ok(DeadlineConnect {
            inner: MakeTlsConnect::<Socket>::make_tls_connect(&mut self.inner, domain)?,
            deadline: self.deadline,
            done: Arc::clone(&self.done),
        })
    }
}

pub(super) struct DeadlineConnect {
    inner: <MakeTlsConnector as MakeTlsConnect<Socket>>::TlsConnect,
    deadline: Instant,
    done: Arc<AtomicBool>,
}

impl TlsConnect<Socket> for DeadlineConnect {
    type Stream = DeadlineStream<<MakeTlsConnector as MakeTlsConnect<Socket>>::Stream>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = BoxFuture<'static, Result<Self::Stream, Self::Error>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let handshake = self.inner.connect(stream);
        let done = self.done;
        Box::pin(async move {
            let stream = tokio::time::timeout_at(deadline, handshake)
                .await
                .map_err(|_| timed_out())??;
            Ok(DeadlineStream {
                inner: stream,
                deadline,
                sleep: None,
                done,
            })
        })
    }
}

/// The TLS stream of one attempt: past the deadline, while the login is not done, reads and
/// writes fail with `TimedOut`.
pub(super) struct DeadlineStream<S> {
    inner: S,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    done: Arc<AtomicBool>,
}

impl<S> DeadlineStream<S> {
    /// `Err` once the deadline has passed during the login; registers a wake-up for it.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.done.load(Ordering::Acquire) {
            self.sleep = None;
            return Ok(());
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Err(timed_out()),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeadlineStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeadlineStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for DeadlineStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}
