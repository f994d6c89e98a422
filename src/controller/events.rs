//! Events about an export (events.k8s.io): what a user sees in `kubectl describe`. Publishing
//! never fails a reconcile or a run: a refused or slow Event is only logged.

use kube::Resource;
use kube::runtime::events::{Event, EventType};

use super::context::Context;
use super::step::Note;
use super::timeouts::API_TIMEOUT;
use crate::spec::BrazeExport;
use crate::text::truncate_bytes;

/// The apiserver's limit on an Event's `note`, in bytes (longer ones are refused, 422).
pub const NOTE_MAX_BYTES: usize = 1024;

/// Publishes `note` about `export` (its message cut to [`NOTE_MAX_BYTES`]); a failure is
/// only logged.
pub async fn publish(ctx: &Context, export: &BrazeExport, note: &Note) {
    let event = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.into(),
        note: Some(truncate_bytes(&note.message, NOTE_MAX_BYTES)),
        action: "Reconcile".into(),
        secondary: None,
    };
    let published = tokio::time::timeout(
        API_TIMEOUT,
        ctx.recorder.publish(&event, &export.object_ref(&())),
    )
    .await;
    if !matches!(published, Ok(Ok(()))) {
        tracing::debug!("cannot publish an event");
    }
}

/// Publishes each of `notes` in turn.
pub async fn publish_all(ctx: &Context, export: &BrazeExport, notes: &[Note]) {
    for note in notes {
        publish(ctx, export, note).await;
    }
}
