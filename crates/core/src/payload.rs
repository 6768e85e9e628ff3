//! A row as a sink takes it: insertAll's JSON, or the Storage Write API's protobuf message.

use crate::proto::ProtoSchema;
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `{"insertId":"…","json":{…}}`: what insertAll sends as it is, and what the dead-letter
    /// table keeps.
    Json(String),
    /// The row's message (metadata columns included) in `schema`'s layout.
    Proto {
        bytes: Vec<u8>,
        schema: Arc<ProtoSchema>,
    },
}

impl Payload {
    /// The payload's size in bytes (what chunking counts).
    pub fn len(&self) -> usize {
        match self {
            Self::Json(s) => s.len(),
            Self::Proto { bytes, .. } => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row as insertAll JSON, its `insertId` its `_version_id`: for the dead-letter table,
    /// and for an insertAll sink given a message (a table whose write method changed while a
    /// slice ran). An error says why a message could not be read back.
    pub fn json(&self) -> Result<Cow<'_, str>, String> {
        match self {
            Self::Json(s) => Ok(Cow::Borrowed(s)),
            Self::Proto { bytes, schema } => {
                let (row, version) = schema.to_json(bytes)?;
                let v = serde_json::json!({"insertId": version, "json": row});
                Ok(Cow::Owned(v.to_string()))
            }
        }
    }

    /// [`Self::json`], or for a message that cannot be read back (never expected: it was
    /// encoded here), a JSON object saying so, so a dead letter still records the failure.
    pub fn json_lossy(&self) -> Cow<'_, str> {
        self.json().unwrap_or_else(|e| {
            Cow::Owned(serde_json::json!({"insertId": "", "json": {}, "error": e}).to_string())
        })
    }
}

impl From<String> for Payload {
    fn from(s: String) -> Self {
        Self::Json(s)
    }
}
