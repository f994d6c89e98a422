//! List and watch: label and field selectors (the field selectors a real apiserver supports
//! on custom resources, 400 for others), lists at the current resourceVersion, and watch
//! streams: from a resourceVersion (replaying the change log) or from now (synthetic `ADDED`
//! events, and the initial-events-end bookmark when asked), delayed by the watch lag, ended
//! by the timeout or with 410 Gone when the watches are expired.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::routing::{Target, channel_stream, ok_json, partial_metadata};
use crate::storage::{ApiState, Change, Inner, api_version_of, kind_of};

fn selector_matches(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => {
                labels.get(k.trim_end_matches('=')).and_then(Value::as_str)
                    == Some(v.trim_start_matches('='))
            }
            None => labels.get(term).is_some(),
        })
}

/// The field selectors a real apiserver supports on custom resources.
fn field_path(key: &str) -> Option<&'static str> {
    match key {
        "metadata.name" => Some("/metadata/name"),
        "metadata.namespace" => Some("/metadata/namespace"),
        _ => None,
    }
}

/// Why a field selector is refused (the apiserver answers 400), if it is.
pub(crate) fn field_selector_error(selector: &str) -> Option<String> {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.split_once('=')
                .map_or(t, |(k, _)| k.trim_end_matches('!'))
        })
        .find(|key| field_path(key).is_none())
        .map(|key| format!("field label not supported: {key}"))
}

/// `metadata.name=x`, `metadata.name==x` and `metadata.name!=x` terms, all of which must hold.
fn fields_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (key, want, equal) = match term.split_once("!=") {
            Some((k, v)) => (k, v, false),
            None => match term.split_once('=') {
                Some((k, v)) => (k, v.trim_start_matches('='), true),
                None => return false,
            },
        };
        let value = field_path(key).and_then(|p| object.pointer(p)?.as_str());
        (value == Some(want)) == equal
    })
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Default)]
struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selectors {
    fn of(query: &HashMap<String, String>) -> Self {
        Self {
            labels: query.get("labelSelector").cloned(),
            fields: query.get("fieldSelector").cloned(),
        }
    }
}

fn visible(c_resource: &str, c_ns: &str, object: &Value, t: &Target, sel: &Selectors) -> bool {
    c_resource == t.resource
        && t.namespace.as_deref().is_none_or(|ns| ns == c_ns)
        && sel.labels.as_deref().is_none_or(|s| {
            selector_matches(
                s,
                object.pointer("/metadata/labels").unwrap_or(&Value::Null),
            )
        })
        && sel
            .fields
            .as_deref()
            .is_none_or(|f| fields_match(f, object))
}

/// A list (counted for [`FakeApiServer::list_count`](crate::FakeApiServer::list_count)); with
/// `metadata_only` (`Accept: …;as=PartialObjectMetadataList`), a `PartialObjectMetadataList`
/// of the objects' metadata alone.
pub(crate) fn list(
    state: &ApiState,
    t: &Target,
    query: &HashMap<String, String>,
    metadata_only: bool,
) -> Response {
    let mut inner = state.lock();
    *inner.lists.entry(t.resource.clone()).or_default() += 1;
    let selectors = Selectors::of(query);
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|(k, v)| visible(&k.0, &k.1, v, t, &selectors))
        .map(|(_, v)| {
            if metadata_only {
                partial_metadata(v)
            } else {
                v.clone()
            }
        })
        .collect();
    let (api_version, kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_owned(),
            "PartialObjectMetadataList".to_owned(),
        )
    } else {
        (
            api_version_of(&t.resource),
            format!("{}List", kind_of(&t.resource)),
        )
    };
    ok_json(&json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    }))
}

fn gone(requested: u64, oldest: u64) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {requested} ({oldest})"), "reason": "Expired", "code": 410}})
}

fn line(v: Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

type Chunk = Result<Bytes, Infallible>;

fn respond(stream: BoxStream<'static, Chunk>) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A watch: the events since `resourceVersion` (or the state now), then the live ones.
pub(crate) fn watch_stream(
    state: &ApiState,
    t: &Target,
    query: &HashMap<String, String>,
) -> Response {
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let target = Target {
        name: None,
        status: false,
        ..t.clone()
    };
    // Subscribing under the lock: the backlog and the live changes meet without a gap.
    let inner = state.lock();
    if since > 0 && since < inner.expired_at {
        let event = line(gone(since, inner.expired_at));
        return respond(futures_util::stream::iter([Ok(event)]).boxed());
    }
    let live = state.changes.subscribe();
    let mut expiry = state.expiry.subscribe();
    expiry.mark_unchanged();
    let backlog = backlog(&inner, &target.resource, since);
    let bookmark = (since == 0 && initial_events).then(|| {
        json!({"type": "BOOKMARK", "object": {"kind": kind_of(&target.resource), "apiVersion": api_version_of(&target.resource), "metadata": {"resourceVersion": inner.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}})
    });
    let last_backlog = if since == 0 {
        inner.rv
    } else {
        backlog.back().map_or(since, |c| c.rv)
    };
    drop(inner);
    let feed = Feed {
        selectors: Selectors::of(query),
        target,
        backlog,
        last_backlog,
        live,
        expiry,
        bookmark,
        deadline: Instant::now() + timeout,
        sent: since,
    };
    respond(channel_stream(move |tx| feed.run(tx)).boxed())
}

/// The events a watch from `since` starts with: the logged changes after it or, for "any"
/// or "most recent" resourceVersion (0), synthetic ADDED events for the state now.
fn backlog(inner: &Inner, resource: &str, since: u64) -> VecDeque<Change> {
    if since > 0 {
        return inner.log.iter().filter(|c| c.rv > since).cloned().collect();
    }
    let now = Instant::now();
    inner
        .objects
        .iter()
        .filter(|(k, _)| k.0 == resource)
        .map(|(k, o)| Change {
            rv: inner.rv,
            resource: k.0.clone(),
            namespace: k.1.clone(),
            kind: "ADDED",
            object: o.clone(),
            due: now,
        })
        .collect()
}

/// One open watch, fed to its response by a task.
struct Feed {
    target: Target,
    selectors: Selectors,
    backlog: VecDeque<Change>,
    /// The resourceVersion the backlog reaches: live changes up to it are in it already.
    last_backlog: u64,
    live: broadcast::Receiver<Change>,
    expiry: watch::Receiver<u64>,
    /// The initial-events-end bookmark, sent once the backlog is.
    bookmark: Option<Value>,
    /// The watch's timeout: it ends then, without an event.
    deadline: Instant,
    /// The resourceVersion of the last event sent (for the 410's message).
    sent: u64,
}

/// What a watch waits for.
enum Wait<T> {
    Ready(T),
    /// A live change already in the backlog (or a lagging receiver): wait again.
    Again,
    /// The watch ends, with this last event if any.
    End(Option<Value>),
}

impl Feed {
    async fn run(mut self, tx: mpsc::Sender<Chunk>) {
        loop {
            let change = match self.backlog.pop_front() {
                Some(c) => c,
                None => {
                    if let Some(b) = self.bookmark.take()
                        && tx.send(Ok(line(b))).await.is_err()
                    {
                        return;
                    }
                    match self.next_live().await {
                        Wait::Ready(c) => c,
                        Wait::Again => continue,
                        Wait::End(last) => return send_last(&tx, last).await,
                    }
                }
            };
            if !visible(
                &change.resource,
                &change.namespace,
                &change.object,
                &self.target,
                &self.selectors,
            ) {
                continue;
            }
            if let Wait::End(last) = self.until_due(&change).await {
                return send_last(&tx, last).await;
            }
            if tx
                .send(Ok(line(
                    json!({"type": change.kind, "object": change.object}),
                )))
                .await
                .is_err()
            {
                return;
            }
            self.sent = change.rv;
        }
    }

    /// The next live change, or the end of the watch (expired or timed out).
    async fn next_live(&mut self) -> Wait<Change> {
        tokio::select! {
            next = self.live.recv() => match next {
                Ok(c) if c.rv > self.last_backlog => Wait::Ready(c),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => Wait::Again,
                Err(broadcast::error::RecvError::Closed) => Wait::End(None),
            },
            _ = self.expiry.changed() => Wait::End(Some(self.expired())),
            () = tokio::time::sleep_until(self.deadline) => Wait::End(None),
        }
    }

    /// A lagging watch cache: the event leaves when it is due (unless the watch ends first).
    async fn until_due(&mut self, change: &Change) -> Wait<()> {
        tokio::select! {
            () = tokio::time::sleep_until(change.due) => Wait::Ready(()),
            _ = self.expiry.changed() => Wait::End(Some(self.expired())),
            () = tokio::time::sleep_until(self.deadline) => Wait::End(None),
        }
    }

    /// The 410 Gone event of an expired watch.
    fn expired(&mut self) -> Value {
        let oldest = *self.expiry.borrow_and_update();
        gone(self.sent, oldest)
    }
}

/// A watch's last event, if it has one.
async fn send_last(tx: &mpsc::Sender<Chunk>, last: Option<Value>) {
    if let Some(event) = last {
        let _ = tx.send(Ok(line(event))).await;
    }
}
