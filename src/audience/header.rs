//! What a stored audience is: whose it is, how its users are identified, the flag they carry,
//! and each member's state.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::spec::IdentifierKind;

/// Which export an audience belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// The export's namespace (absent for a `run` file without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The export's name.
    pub name: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What an audience is about: its owner, how its users are identified, and the flag they
/// carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    /// The export it belongs to.
    pub export: Owner,
    /// How its users are identified.
    pub identifier: IdentifierKind,
    /// The alias label, for `user_alias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_label: Option<String>,
    /// The array attribute the flag is in.
    pub attribute: String,
    /// The flag (the export's `exportName`).
    pub export_name: String,
    /// When a run last sent every user (a full resync); absent before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full_resync: Option<Timestamp>,
    /// How many members the body holds.
    #[serde(default)]
    pub members: u64,
    /// The Braze workspace the flags were written to: a keyed fingerprint of the endpoint
    /// and the API key ([`workspace_fingerprint`]), never the key. Absent in audiences written
    /// before it was recorded (taken to be the run's own workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Flags besides this audience's own that some members may hold: written by a run that
    /// changed `attribute` or `exportName` and stopped before it saved. Removals take them off
    /// too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stray_flags: Vec<Flag>,
}

/// A flag: an array attribute and the value in it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flag {
    /// The array attribute.
    pub attribute: String,
    /// The value (the export's `exportName`).
    pub export_name: String,
}

/// The fingerprint of a Braze workspace, as the stored audience records it: HMAC-SHA-256
/// keyed by the API key over the endpoint, its first 8 bytes in hex. The same endpoint and
/// key give the same fingerprint in every build; it says nothing of the key to whoever does
/// not hold it.
pub fn workspace_fingerprint(endpoint: &str, api_key: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, api_key.as_bytes());
    let mut msg = b"braze-export-operator workspace v1\0".to_vec();
    msg.extend_from_slice(endpoint.as_bytes());
    let tag = ring::hmac::sign(&key, &msg);
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Header {
    /// Every flag its members may hold: its own and the stray ones, sorted, each once.
    pub fn flags(&self) -> Vec<Flag> {
        let mut all: Vec<Flag> = std::iter::once(self.flag())
            .chain(self.stray_flags.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The flag this audience's members carry.
    pub fn flag(&self) -> Flag {
        Flag {
            attribute: self.attribute.clone(),
            export_name: self.export_name.clone(),
        }
    }

    /// Refuses an audience that belongs to another export or identifies users another way:
    /// using it would remove flags from the wrong users. Says why, naming no user.
    pub fn check(
        &self,
        owner: &Owner,
        identifier: IdentifierKind,
        alias_label: Option<&str>,
    ) -> Result<(), String> {
        if self.export != *owner {
            return Err(format!(
                "it belongs to the export {}, not {owner}",
                self.export
            ));
        }
        if self.identifier != identifier {
            return Err(format!(
                "it holds {} identifiers, and this export uses {}",
                self.identifier.key(),
                identifier.key()
            ));
        }
        if identifier == IdentifierKind::UserAlias && self.alias_label.as_deref() != alias_label {
            return Err(format!(
                "it holds user aliases labelled {:?}, and this export uses {:?}",
                self.alias_label.as_deref().unwrap_or_default(),
                alias_label.unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// Whether a member surely holds the flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemberState {
    /// Braze acknowledged the flag.
    Flagged = 0,
    /// Unsure: the add or the remove was never acknowledged (it may or may not have been
    /// applied), or an earlier flag may remain. Sent again by a delta run; removed when the
    /// user leaves.
    Pending = 1,
}

/// One user of an audience. Its `Debug` form hides the identifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Member {
    /// The identifier (personal data).
    pub id: String,
    /// Whether the flag is surely there.
    pub state: MemberState,
    /// What was last sent for the user ([`crate::audience::codec::fingerprint`]); 0 when
    /// unknown (an audience of version 1, or a member recorded pending).
    pub fingerprint: u32,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Member(<{} bytes>, {:?})", self.id.len(), self.state)
    }
}

/// An audience held in memory whole (for small audiences and tests; the pipeline streams).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audience {
    /// What it is about (`members` is set when encoding).
    pub header: Header,
    /// Its users.
    pub members: Vec<Member>,
}

#[cfg(test)]
impl Header {
    /// The header of the unit tests' audiences: export `e`, `external_id`, flag
    /// `looker_export` = `export_name`.
    pub(crate) fn example(export_name: &str) -> Self {
        Self {
            export: Owner {
                namespace: None,
                name: "e".into(),
            },
            identifier: IdentifierKind::ExternalId,
            alias_label: None,
            attribute: "looker_export".into(),
            export_name: export_name.into(),
            last_full_resync: None,
            members: 0,
            workspace: None,
            stray_flags: Vec::new(),
        }
    }
}
