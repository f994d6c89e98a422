//! The stored audience: the users an export flagged, kept between runs so that users who
//! leave the Look can lose the flag (`removal: Remove`) and users already flagged need not be
//! sent again (`delta: true`).
//!
//! It is personal data: identifiers are kept only in the compressed body, and never appear
//! in a log line, an error message, a status or an Event. The controller keeps it in Secrets
//! ([`Encoded::parts`], each under [`MAX_PART_BYTES`]); the `run` command keeps it in a file
//! (`--state`, [`read_file`] and [`write_file`]).

pub mod codec;
pub mod encoded;
pub mod file;
pub mod header;
pub mod merged;
pub mod removal;
pub mod seen;
pub mod writer;

#[cfg(test)]
mod tests;

pub use codec::AudienceError;
pub use encoded::{Chain, Encoded, MAX_PART_BYTES, Output, decode, encode};
pub use file::{pending_path, read_file, read_pending, remove_pending, write_file};
pub use header::{Audience, Flag, Header, Member, MemberState, Owner, workspace_fingerprint};
pub use removal::{ALLOW_REMOVAL_ANNOTATION, removal_allowed_once};
pub use writer::BodyWriter;
