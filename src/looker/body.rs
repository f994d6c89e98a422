//! Moves a streamed HTTP body from the async world to the blocking parser, counting only
//! the time spent waiting on Looker against the run's timeout: the wait for the response
//! (a [`WaitBudget`]) and, once the body flows, each stall in which Looker sends nothing
//! while the pipeline is ready to read. Time the pipeline spends waiting on Braze is free.

use std::future::Future;
use std::io::{self, Read};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::cap::{MAX_STRING_BYTES, StringCap};
use crate::text::error_chain;

/// Time Looker may still take. Time spent waiting on anything else (a slow Braze holding the
/// pipeline back) is not counted.
#[derive(Clone, Copy, Debug)]
pub struct WaitBudget {
    remaining: Duration,
}

/// The budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfTime;

impl WaitBudget {
    /// A budget of `total`.
    pub fn new(total: Duration) -> Self {
        Self { remaining: total }
    }

    /// What is left.
    pub fn remaining(&self) -> Duration {
        self.remaining
    }

    /// Awaits `f`, charging the time it takes; fails when the budget runs out first.
    pub async fn wait<F: Future>(&mut self, f: F) -> Result<F::Output, OutOfTime> {
        let start = Instant::now();
        let out = tokio::time::timeout(self.remaining, f).await;
        self.remaining = self.remaining.saturating_sub(start.elapsed());
        out.map_err(|_| OutOfTime)
    }
}

/// How the body transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transfer {
    /// Looker sent the whole body.
    Complete,
    /// The reader stopped listening (the parse ended first).
    Abandoned,
    /// Looker sent nothing for the whole timeout while the pipeline was ready to read.
    TimedOut,
    /// The run was cancelled.
    Cancelled,
    /// The connection failed; the detail names what happened.
    Failed(String),
}

/// Starts forwarding `response`'s body; returns the blocking reader and the task's handle,
/// whose value says how the transfer ended and how many bytes it moved. `stall` bounds each
/// wait for the next chunk (not the whole body: a Look that Braze paces for an hour is fine).
pub fn forward(
    response: reqwest::Response,
    stall: Duration,
    cancel: CancellationToken,
) -> (ChannelReader, JoinHandle<(Transfer, u64)>) {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let task = tokio::spawn(async move {
        let mut stream = response.bytes_stream();
        let mut bytes = 0u64;
        let mut cap = StringCap::new(MAX_STRING_BYTES);
        let mut pieces = Vec::new();
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => {
                    let _ = tx.send(Err(io::Error::new(io::ErrorKind::Interrupted, "run cancelled"))).await;
                    return (Transfer::Cancelled, bytes);
                }
                next = tokio::time::timeout(stall, stream.next()) => next.map_err(|_| OutOfTime),
            };
            let (end, item) = match next {
                Err(OutOfTime) => (
                    Transfer::TimedOut,
                    Err(io::Error::new(io::ErrorKind::TimedOut, "Looker timed out")),
                ),
                Ok(None) => {
                    cap.finish(&mut pieces);
                    for piece in pieces.drain(..) {
                        if tx.send(Ok(piece)).await.is_err() {
                            return (Transfer::Abandoned, bytes);
                        }
                    }
                    return (Transfer::Complete, bytes);
                }
                Ok(Some(Ok(chunk))) => {
                    bytes += chunk.len() as u64;
                    // Long strings are cut here, beside the parser thread rather than on it.
                    cap.filter(chunk, &mut pieces);
                    for piece in pieces.drain(..) {
                        if tx.send(Ok(piece)).await.is_err() {
                            return (Transfer::Abandoned, bytes);
                        }
                    }
                    continue;
                }
                Ok(Some(Err(e))) if e.is_timeout() => (
                    Transfer::TimedOut,
                    Err(io::Error::new(io::ErrorKind::TimedOut, "Looker timed out")),
                ),
                Ok(Some(Err(e))) => {
                    let detail = format!(
                        "the connection failed after {bytes} bytes ({})",
                        error_chain(&e)
                    );
                    (
                        Transfer::Failed(detail.clone()),
                        Err(io::Error::other(detail)),
                    )
                }
            };
            let _ = tx.send(item).await;
            return (end, bytes);
        }
    });
    (
        ChannelReader {
            rx,
            current: Bytes::new(),
        },
        task,
    )
}

/// A blocking [`Read`] over the forwarded chunks. Use it on a blocking thread only.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.current.has_remaining() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.remaining());
        self.current.copy_to_slice(&mut buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_only_waiting() {
        let mut b = WaitBudget::new(Duration::from_secs(10));
        b.wait(tokio::time::sleep(Duration::from_secs(4)))
            .await
            .unwrap();
        assert_eq!(b.remaining(), Duration::from_secs(6));
        tokio::time::sleep(Duration::from_secs(100)).await; // not charged
        assert_eq!(
            b.wait(tokio::time::sleep(Duration::from_secs(7))).await,
            Err(OutOfTime)
        );
        assert_eq!(b.remaining(), Duration::ZERO);
    }
}
